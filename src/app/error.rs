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

use crate::bundle::UnpackError;
use crate::names::{AppName, Hostname};
use crate::nginx::NginxError;
use crate::postgres::PgError;
use crate::postgres::StoreError;
use crate::problem::Invalid;

/// Why a deploy failed. In every case the version that was serving keeps serving, and nothing
/// of the new one is left (processes, ports, folder).
#[derive(Debug)]
pub enum DeployError {
    /// The file in `incoming/` cannot be used as it is (gone, a symlink, not a regular file).
    Bundle(String),
    /// The archive is not a complete bundle, was refused, or could not be written out.
    Unpack(UnpackError),
    /// `config/keter.yaml` is invalid.
    Config(Invalid),
    /// A stanza's `exec`, static root or certificate is unusable: `key` names it.
    Stanza { key: String, message: String },
    /// The site cannot be built: a static root or a certificate (the message names the key).
    Site(String),
    /// Another app serves one of the bundle's hosts.
    HostTaken { host: Hostname, owner: AppName },
    /// The app's user, its folder or its static roots are not as isolation needs them
    /// (README "Security"): the user cannot be made or cannot reach its folder, the folder
    /// cannot be given to it, or Nginx's workers cannot read a static root. The message names
    /// the folder, the user and the permission.
    Isolation(String),
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
    pub const KINDS: [&'static str; 9] = [
        "bundle",
        "unpack",
        "config",
        "host-taken",
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
    /// unreachable, a full disk, no free port, a version that did not answer in time (it may
    /// next time, once what it waits for is back). A bad configuration, a hostile archive or a
    /// program that exits before it answers waits for a new bundle.
    pub fn transient(&self) -> bool {
        match self {
            DeployError::Unpack(UnpackError::Io(_)) => true,
            DeployError::Postgres(e) => match e {
                // A listener keter does not trust may be gone at the next try (the server
                // back on its port); an operator's fix of the server is picked up too.
                PgError::Connect { .. }
                | PgError::Untrusted { .. }
                | PgError::Sql { .. }
                | PgError::Random(_) => true,
                PgError::Store(StoreError::Read { .. } | StoreError::Write { .. }) => true,
                PgError::Store(StoreError::Invalid { .. }) | PgError::Conflict(_) => false,
            },
            DeployError::NoFreePort(_) => true,
            DeployError::Spawn { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EAGAIN | libc::ENOMEM | libc::ENFILE | libc::EMFILE)
            ),
            DeployError::NotReady(NotReady::Timeout { .. }) => true,
            DeployError::Nginx(e) => e.transient(),
            DeployError::Bundle(_)
            | DeployError::Unpack(_)
            | DeployError::Config(_)
            | DeployError::Stanza { .. }
            | DeployError::Site(_)
            | DeployError::HostTaken { .. }
            | DeployError::Isolation(_)
            | DeployError::NoPostgresServer
            | DeployError::NotReady(NotReady::Exited { .. }) => false,
        }
    }
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeployError::Bundle(m) | DeployError::Site(m) | DeployError::Isolation(m) => {
                f.write_str(m)
            }
            DeployError::Unpack(e) => write!(f, "{e}"),
            DeployError::Config(e) => write!(f, "{e}"),
            DeployError::Stanza { key, message } => write!(f, "{key}: {message}"),
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
            DeployError::Unpack(e) => Some(e),
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
        assert!(DeployError::Unpack(UnpackError::Io("No space left on device".into())).transient());
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
}
