//! Why a deploy did not go live, as types: each failure keeps its source, says which kind it is
//! (shown by the status API and `keter status`), and whether it may pass by itself, in which
//! case the worker tries the same bundle again with backoff (`docs/lifecycle.md`, "Failed
//! deploys").

use std::fmt;
use std::io;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::site::SiteError;
use crate::bundle::{PathError, UnpackError};
use crate::isolation::IsolationError;
use crate::names::{AppName, Hostname};
use crate::nginx::NginxError;
use crate::postgres::PgError;
use crate::postgres::StoreError;
use crate::problem::Invalid;

/// Why a deploy failed. In every case the version that was serving keeps serving, and nothing
/// of the new one is left (processes, ports, folder).
#[derive(Debug)]
pub enum DeployError {
    /// The file in `incoming/` cannot be used as it is (gone, a symlink, not a regular file):
    /// an [`UnpackError::NotABundleFile`].
    Bundle(UnpackError),
    /// The archive is not a complete bundle, was refused, or could not be written out.
    Unpack(UnpackError),
    /// `config/keter.yaml` is invalid.
    Config(Invalid),
    /// A stanza's `exec` is unusable: `key` names it.
    Stanza { key: String, source: PathError },
    /// The site cannot be built: a stanza's own certificate (the error names its key).
    Site(SiteError),
    /// Another app serves one of the bundle's hosts.
    HostTaken { host: Hostname, owner: AppName },
    /// The app's user, its folder or its static roots are not as isolation needs them
    /// (README "Security"): the user cannot be made or cannot reach its folder, the folder
    /// cannot be given to it, or Nginx's workers cannot read a static root. The message names
    /// the folder, the user and the permission.
    Isolation(IsolationError),
    /// The bundle asks for the postgres plugin and keter has no `postgres` section.
    NoPostgresServer,
    /// The postgres plugin could not provide the database.
    Postgres(PgError),
    /// Every port of `port-range` is in use.
    NoFreePort(RangeInclusive<u16>),
    /// A process could not be started.
    Spawn { program: PathBuf, source: io::Error },
    /// A webapp did not answer its health check.
    NotReady(NotReady),
    /// Nginx did not take the new site.
    Nginx(NginxError),
}

/// How a webapp failed its readiness check. `last` is what the last check saw, `output` the
/// app's last lines (already formatted as `; last output: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The process exited before it answered.
    Exited {
        status: Option<ExitStatus>,
        last: String,
        output: String,
    },
    /// It did not answer below 500 within `readiness-timeout`.
    Timeout {
        timeout: Duration,
        last: String,
        output: String,
    },
}

impl DeployError {
    /// Every value of [`DeployError::kind`].
    pub const KINDS: [&'static str; 10] = [
        "bundle",
        "unpack",
        "config",
        "host-taken",
        "isolation",
        "postgres",
        "ports",
        "spawn",
        "not-ready",
        "nginx",
    ];

    /// The kind shown next to the message: `bundle`, `unpack`, `config`, `host-taken`,
    /// `isolation`, `postgres`, `ports`, `spawn`, `not-ready` or `nginx`.
    pub fn kind(&self) -> &'static str {
        match self {
            DeployError::Bundle(_) => "bundle",
            DeployError::Unpack(_) => "unpack",
            DeployError::Isolation(_) => "isolation",
            DeployError::Config(_) | DeployError::Stanza { .. } | DeployError::Site(_) => "config",
            DeployError::HostTaken { .. } => "host-taken",
            DeployError::NoPostgresServer | DeployError::Postgres(_) => "postgres",
            DeployError::NoFreePort(_) => "ports",
            DeployError::Spawn { .. } => "spawn",
            DeployError::NotReady(_) => "not-ready",
            DeployError::Nginx(_) => "nginx",
        }
    }

    /// True for a failure that can pass without a new bundle: a database or Nginx that is
    /// unreachable, no free port, a version that did not answer in time (it may next time,
    /// once what it waits for is back), and an I/O error that [`io_passes`] says may pass (a
    /// full disk, too many open files). A bad configuration, a hostile archive, a bundle that
    /// is gone or that keter may not read, or a program that exits before it answers waits
    /// for a new bundle.
    pub fn transient(&self) -> bool {
        match self {
            DeployError::Bundle(e) | DeployError::Unpack(e) => e.io_error().is_some_and(io_passes),
            DeployError::Postgres(e) => match e {
                // A listener keter does not trust may be gone at the next try (the server
                // back on its port); an operator's fix of the server is picked up too.
                PgError::Connect { .. }
                | PgError::Untrusted { .. }
                | PgError::Sql { .. }
                | PgError::Random(_) => true,
                PgError::Store(
                    StoreError::Read { source, .. } | StoreError::Write { source, .. },
                ) => io_passes(source),
                PgError::Store(StoreError::Invalid { .. } | StoreError::Render { .. })
                | PgError::Conflict(_) => false,
            },
            DeployError::NoFreePort(_) => true,
            DeployError::Spawn { source, .. } => io_passes(source),
            // A full disk while the folder is handed over or a certificate copied, or no
            // descriptor left to check or read them.
            DeployError::Isolation(e) => e.io_error().is_some_and(io_passes),
            DeployError::Site(e) => e.io_error().is_some_and(io_passes),
            DeployError::Stanza { source, .. } => source.io_error().is_some_and(io_passes),
            DeployError::NotReady(NotReady::Timeout { .. }) => true,
            DeployError::Nginx(e) => e.transient(),
            DeployError::Config(_)
            | DeployError::HostTaken { .. }
            | DeployError::NoPostgresServer
            | DeployError::NotReady(NotReady::Exited { .. }) => false,
        }
    }
}

/// Whether an I/O error may pass by itself, so that the same operation can succeed later:
///
/// * a lack of some resource of the machine: a full disk or quota (`ENOSPC`, `EDQUOT`), no
///   memory (`ENOMEM`), too many open files or processes (`EMFILE`, `ENFILE`, `EAGAIN`), a
///   busy file (`EBUSY`, `ETXTBSY`);
/// * an interrupted or timed-out call (`EINTR`, `ETIMEDOUT`).
///
/// Everything else does not: a file that is gone (`ENOENT`) or that keter may not read
/// (`EACCES`, `EPERM`), a path through a file (`ENOTDIR`), a read-only file system, a
/// hardware error (`EIO`): trying the same bundle again would fail the same way until someone
/// acts, and that someone brings a new bundle or restarts keter.
pub fn io_passes(e: &io::Error) -> bool {
    use io::ErrorKind as K;
    match e.kind() {
        K::StorageFull
        | K::QuotaExceeded
        | K::OutOfMemory
        | K::WouldBlock
        | K::ResourceBusy
        | K::ExecutableFileBusy
        | K::Interrupted
        | K::TimedOut => true,
        // The standard library has no kind of its own for these two.
        _ => matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)),
    }
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeployError::Site(e) => write!(f, "{e}"),
            DeployError::Isolation(e) => write!(f, "{e}"),
            DeployError::Bundle(e) | DeployError::Unpack(e) => write!(f, "{e}"),
            DeployError::Config(e) => write!(f, "{e}"),
            DeployError::Stanza { key, source } => write!(f, "{key}: {source}"),
            DeployError::HostTaken { host, owner } => {
                write!(f, "the host {host} is already served by the app {owner}")
            }
            DeployError::NoPostgresServer => f.write_str(
                "the bundle asks for the postgres plugin, but keter's configuration has no \
                 `postgres` section naming the server",
            ),
            DeployError::Postgres(e) => write!(f, "postgres plugin: {e}"),
            DeployError::NoFreePort(range) => {
                write!(f, "no free port left in port-range {range:?}")
            }
            DeployError::Spawn { program, source } => {
                write!(f, "cannot start {}: {source}", program.display())
            }
            DeployError::NotReady(NotReady::Exited {
                status,
                last,
                output,
            }) => write!(
                f,
                "not ready: the process exited with {} before answering ({last}){output}",
                crate::process::describe_exit(*status)
            ),
            DeployError::NotReady(NotReady::Timeout {
                timeout,
                last,
                output,
            }) => write!(
                f,
                "not ready within {timeout:?} (readiness-timeout): {last}{output}"
            ),
            DeployError::Nginx(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DeployError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DeployError::Bundle(e) | DeployError::Unpack(e) => Some(e),
            DeployError::Isolation(e) => Some(e),
            DeployError::Stanza { source, .. } => Some(source),
            DeployError::Site(e) => Some(e),
            DeployError::Spawn { source, .. } => Some(source),
            DeployError::Postgres(e) => Some(e),
            DeployError::Nginx(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_failures_are_retried_and_bad_bundles_are_not() {
        let pg_down = DeployError::Postgres(PgError::Connect {
            server: "127.0.0.1:5432".into(),
            message: "refused".into(),
        });
        assert!(pg_down.transient());
        assert_eq!(pg_down.kind(), "postgres");
        let full = UnpackError::Io {
            op: crate::bundle::Op::Write,
            path: "/var/lib/keter/temp/app-1/big".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(DeployError::Unpack(full).transient());
        assert!(!DeployError::Unpack(UnpackError::Refused("..".into())).transient());
        assert!(DeployError::NoFreePort(4000..=4001).transient());
        assert!(
            DeployError::Nginx(NginxError::Unconfirmed(crate::nginx::Unconfirmed::Stopped))
                .transient()
        );
        assert!(!DeployError::Nginx(NginxError::Rejected("bad".into())).transient());
        assert!(!DeployError::Config(Invalid(Vec::new())).transient());
        assert!(!DeployError::NoPostgresServer.transient());
        let timeout = NotReady::Timeout {
            timeout: Duration::from_secs(1),
            last: "never listened on port 4000".into(),
            output: String::new(),
        };
        assert!(DeployError::NotReady(timeout).transient());
        use std::os::unix::process::ExitStatusExt;
        let exited = NotReady::Exited {
            status: Some(ExitStatus::from_raw(3 << 8)),
            last: "never listened on port 4000".into(),
            output: "; the app printed nothing".into(),
        };
        let e = DeployError::NotReady(exited);
        assert!(!e.transient());
        assert_eq!(
            e.to_string(),
            "not ready: the process exited with exit code 3 before answering (never listened on port 4000); the app printed nothing"
        );
    }

    /// A bundle that is gone or that keter may not read fails the same way at every try: it
    /// waits for a new bundle instead of being retried forever. Made by the real unpack, on
    /// the real file system.
    #[test]
    fn a_bundle_that_is_gone_or_unreadable_is_not_retried() {
        let dir = std::env::temp_dir().join(format!("keter-unit-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let limits = crate::config::BundleLimits::default();

        let gone = dir.join("gone.keter");
        let e = crate::bundle::unpack::open_bundle(&gone).unwrap_err();
        assert_eq!(
            e.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        let e = DeployError::Bundle(e);
        assert_eq!(e.kind(), "bundle");
        assert!(!e.transient(), "{e}");

        // The folder it unpacks into cannot be made (its parent vanished).
        let bundle = dir.join("app.keter");
        std::fs::write(&bundle, b"not even gzip").unwrap();
        let dest = dir.join("temp-gone").join("app-1");
        let e = crate::bundle::unpack(&bundle, &dest, &limits).unwrap_err();
        assert!(e.to_string().starts_with("cannot create "), "{e}");
        assert_eq!(
            e.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        let e = DeployError::Unpack(e);
        assert_eq!(e.kind(), "unpack");
        assert!(!e.transient(), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        let denied = DeployError::Bundle(UnpackError::NotABundleFile {
            path: gone.clone(),
            why: crate::bundle::NotABundle::Open(io::Error::from_raw_os_error(libc::EACCES)),
        });
        assert!(!denied.transient(), "{denied}");
        assert!(
            std::error::Error::source(&denied)
                .and_then(std::error::Error::source)
                .is_some(),
            "the io::Error is kept two levels down"
        );
        // The same open failing for lack of descriptors may pass.
        let emfile = DeployError::Bundle(UnpackError::NotABundleFile {
            path: gone,
            why: crate::bundle::NotABundle::Open(io::Error::from_raw_os_error(libc::EMFILE)),
        });
        assert!(emfile.transient(), "{emfile}");
    }

    #[test]
    fn io_errors_are_classified_by_kind() {
        for (errno, passes) in [
            (libc::ENOSPC, true),
            (libc::EDQUOT, true),
            (libc::ENOMEM, true),
            (libc::EMFILE, true),
            (libc::ENFILE, true),
            (libc::EAGAIN, true),
            (libc::EBUSY, true),
            (libc::EINTR, true),
            (libc::ETIMEDOUT, true),
            (libc::ENOENT, false),
            (libc::EACCES, false),
            (libc::EPERM, false),
            (libc::ENOTDIR, false),
            (libc::EROFS, false),
            (libc::EIO, false),
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert_eq!(io_passes(&e), passes, "{e}");
        }
        // Not by its text: an error that only says "No space left" is no full disk.
        assert!(!io_passes(&io::Error::other("No space left on device")));
    }

    /// One value of every variant: the `match` fails to compile when a variant is added, so
    /// that it is added here and its kind to `KINDS`.
    fn one_of_each() -> Vec<DeployError> {
        let all = vec![
            DeployError::Bundle(UnpackError::Refused("x".into())),
            DeployError::Unpack(UnpackError::Refused("x".into())),
            DeployError::Config(Invalid(Vec::new())),
            DeployError::Stanza {
                key: "exec".into(),
                source: crate::bundle::PathError {
                    path: "x".into(),
                    why: crate::bundle::PathWhy::NotInBundle,
                },
            },
            DeployError::Site(SiteError::CopyMissing {
                origin: "ssl".into(),
                dir: "/x".into(),
            }),
            DeployError::HostTaken {
                host: Hostname::new("a.example").unwrap(),
                owner: AppName::new("other").unwrap(),
            },
            DeployError::Isolation(IsolationError::NoWorkers),
            DeployError::NoPostgresServer,
            DeployError::Postgres(PgError::Conflict("x".into())),
            DeployError::NoFreePort(4000..=4001),
            DeployError::Spawn {
                program: "/bin/x".into(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            },
            DeployError::NotReady(NotReady::Timeout {
                timeout: Duration::from_secs(1),
                last: String::new(),
                output: String::new(),
            }),
            DeployError::Nginx(NginxError::Rejected("x".into())),
        ];
        for e in &all {
            match e {
                DeployError::Bundle(_)
                | DeployError::Unpack(_)
                | DeployError::Config(_)
                | DeployError::Stanza { .. }
                | DeployError::Site(_)
                | DeployError::HostTaken { .. }
                | DeployError::Isolation(_)
                | DeployError::NoPostgresServer
                | DeployError::Postgres(_)
                | DeployError::NoFreePort(_)
                | DeployError::Spawn { .. }
                | DeployError::NotReady(_)
                | DeployError::Nginx(_) => {}
            }
        }
        all
    }

    #[test]
    fn kinds_lists_every_kind_and_nothing_else() {
        let seen: std::collections::BTreeSet<&str> =
            one_of_each().iter().map(DeployError::kind).collect();
        let listed: std::collections::BTreeSet<&str> = DeployError::KINDS.into_iter().collect();
        assert_eq!(seen, listed);
        assert_eq!(
            listed.len(),
            DeployError::KINDS.len(),
            "a kind listed twice"
        );
    }
}
