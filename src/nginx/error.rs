//! Why keter's Nginx files could not be rendered or made live, as types: each failure keeps
//! what it concerns (the file, the pid, the generation) and its underlying error as its
//! [`std::error::Error::source`], and [`NginxError::transient`] says from the type alone
//! whether trying again may succeed (`src/app/error.rs` retries such deploys with backoff).
//!
//! Sources are held in an `Arc` so that one failure can answer every change of a batch.

use std::error::Error;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::system::NotRunning;
use crate::names::AppName;

/// Why a change could not be made live. In every case the previous files are back in place.
#[derive(Debug, Clone)]
pub enum NginxError {
    /// `nginx -t` refused the configuration: Nginx's own message, its lines joined by ` / `.
    Rejected(String),
    /// System mode: `nginx -t` fails because of a file that is not keter's (another site on
    /// the host, or the main configuration). Nginx keeps running what it ran before.
    Foreign { file: PathBuf, message: String },
    /// `nginx -t` could not be run at all.
    Test {
        binary: PathBuf,
        source: Arc<io::Error>,
    },
    /// Nginx did not take the configuration: not confirmed in time, not running, not
    /// signalled.
    Unconfirmed(Unconfirmed),
    /// One of keter's files could not be written, removed or read (disk full, permissions).
    File {
        path: PathBuf,
        source: Arc<io::Error>,
    },
    /// A configuration could not be rendered.
    Render(RenderError),
    /// The controller's thread could not be started.
    Thread(Arc<io::Error>),
}

/// Why Nginx did not take a configuration.
#[derive(Debug, Clone)]
pub enum Unconfirmed {
    /// The control socket did not answer `generation` (or a later one) within `timeout`;
    /// `last` is what it answered last. `unincluded` is set in system mode when the control
    /// socket does not exist: the host's Nginx may not include `http.conf` (that path).
    Timeout {
        generation: u64,
        timeout: Duration,
        last: Answered,
        unincluded: Option<PathBuf>,
    },
    /// System mode: no master to signal.
    NotRunning(NotRunning),
    /// SIGHUP could not be sent to the master `pid`.
    Signal { pid: i32, source: nix::errno::Errno },
    /// Managed mode: the master could not be started.
    Start {
        binary: PathBuf,
        source: Arc<io::Error>,
    },
    /// Managed mode: the master's exit could not be watched.
    Watch(Arc<io::Error>),
    /// The controller has stopped: the daemon is shutting down.
    Stopped,
}

/// What Nginx's control socket answered instead of the generation awaited.
#[derive(Debug, Clone)]
pub enum Answered {
    /// An earlier generation.
    Older(u64),
    /// A worker that is not the current master's (workers of a master that died answer until
    /// they are stopped).
    Stranger(i32),
    /// An HTTP status other than 200.
    Status(u16),
    /// A body that is not `GENERATION PID`.
    Garbled(String),
    /// No answer: nothing listens, or it did not answer in time.
    Nothing(Arc<io::Error>),
}

/// Why a configuration file could not be rendered.
#[derive(Debug, Clone)]
pub enum RenderError {
    /// A built-in template does not parse.
    Template {
        name: &'static str,
        source: Arc<tera::Error>,
    },
    /// Rendering a template failed.
    Render {
        name: &'static str,
        source: Arc<tera::Error>,
    },
    /// A path under `root` cannot be written into Nginx's configuration.
    Root { path: PathBuf, reason: String },
    /// The control socket's path is longer than a unix socket's address holds.
    SocketPath(PathBuf),
    /// A stanza with basic-auth has no password file.
    NoPasswordFile(AppName),
}

impl NginxError {
    /// An I/O failure on `path`.
    pub fn file(path: impl Into<PathBuf>, source: io::Error) -> NginxError {
        NginxError::File {
            path: path.into(),
            source: Arc::new(source),
        }
    }

    /// True when the same change may go in later without a new bundle: Nginx down, slow or
    /// not signalled, a full disk or a permission an operator fixes, another site's broken
    /// file on the host. False when the change itself is at fault: `nginx -t` refuses it, or
    /// it cannot be rendered.
    pub fn transient(&self) -> bool {
        match self {
            NginxError::Rejected(_) | NginxError::Render(_) => false,
            NginxError::Foreign { .. }
            | NginxError::Test { .. }
            | NginxError::Unconfirmed(_)
            | NginxError::File { .. }
            | NginxError::Thread(_) => true,
        }
    }
}

impl From<RenderError> for NginxError {
    fn from(e: RenderError) -> NginxError {
        NginxError::Render(e)
    }
}

impl From<Unconfirmed> for NginxError {
    fn from(e: Unconfirmed) -> NginxError {
        NginxError::Unconfirmed(e)
    }
}

impl fmt::Display for NginxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NginxError::Rejected(m) => write!(f, "nginx -t rejected the configuration: {m}"),
            NginxError::Foreign { file, message } => write!(
                f,
                "nginx -t fails because of {}, which is not keter's file; Nginx keeps its running configuration until that file is fixed: {message}",
                file.display()
            ),
            NginxError::Test { binary, source } => write!(
                f,
                "cannot test the Nginx configuration: cannot run {}: {source}",
                binary.display()
            ),
            NginxError::Unconfirmed(e) => {
                write!(f, "Nginx did not take the new configuration: {e}")
            }
            NginxError::File { path, source } => write!(
                f,
                "cannot write the Nginx configuration: {}: {source}",
                path.display()
            ),
            NginxError::Render(e) => write!(f, "cannot write the Nginx configuration: {e}"),
            NginxError::Thread(e) => write!(f, "cannot start the nginx controller thread: {e}"),
        }
    }
}

impl Error for NginxError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            NginxError::Test { source, .. } | NginxError::File { source, .. } => Some(&**source),
            NginxError::Thread(source) => Some(&**source),
            NginxError::Unconfirmed(e) => Some(e),
            NginxError::Render(e) => Some(e),
            NginxError::Rejected(_) | NginxError::Foreign { .. } => None,
        }
    }
}

impl fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unconfirmed::Timeout {
                generation,
                timeout,
                last,
                unincluded,
            } => {
                write!(
                    f,
                    "generation {generation} not confirmed within {timeout:?} ({last})"
                )?;
                if let Some(http_conf) = unincluded {
                    write!(
                        f,
                        "; is {} included by Nginx's main configuration? The package's /etc/nginx/conf.d/keter.conf includes it for the root /opt/keter",
                        http_conf.display()
                    )?;
                }
                Ok(())
            }
            Unconfirmed::NotRunning(e) => write!(f, "{e}"),
            Unconfirmed::Signal { pid, source } => {
                write!(f, "cannot signal Nginx (pid {pid}): {source}")
            }
            Unconfirmed::Start { binary, source } => {
                write!(f, "cannot start {}: {source}", binary.display())
            }
            Unconfirmed::Watch(e) => write!(f, "cannot watch the Nginx master: {e}"),
            Unconfirmed::Stopped => f.write_str("the nginx controller has stopped"),
        }
    }
}

impl Error for Unconfirmed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Unconfirmed::Signal { source, .. } => Some(source),
            Unconfirmed::Start { source, .. } => Some(&**source),
            Unconfirmed::Watch(source) => Some(&**source),
            Unconfirmed::NotRunning(e) => Some(e),
            Unconfirmed::Timeout { last, .. } => Some(last),
            Unconfirmed::Stopped => None,
        }
    }
}

impl fmt::Display for Answered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answered::Older(g) => write!(f, "still generation {g}"),
            Answered::Stranger(w) => {
                write!(
                    f,
                    "answered by worker {w}, which is not the current master's"
                )
            }
            Answered::Status(s) => write!(f, "status {s}"),
            Answered::Garbled(body) => write!(f, "unexpected answer {body:?}"),
            Answered::Nothing(e) => write!(f, "{e}"),
        }
    }
}

impl Error for Answered {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Answered::Nothing(e) => Some(&**e),
            _ => None,
        }
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tera's own message is only the top of its chain ("Failed to render 'app.conf'"):
        // the reason is further down.
        let chain = |f: &mut fmt::Formatter<'_>, e: &tera::Error| {
            write!(f, "{e}")?;
            let mut next = e.source();
            while let Some(cause) = next {
                write!(f, ": {cause}")?;
                next = cause.source();
            }
            Ok(())
        };
        match self {
            RenderError::Template { name, source } => {
                write!(f, "template {name}: ")?;
                chain(f, source)
            }
            RenderError::Render { name, source } => {
                write!(f, "rendering {name}: ")?;
                chain(f, source)
            }
            // The reason names the path.
            RenderError::Root { reason, .. } => write!(f, "root: {reason}"),
            RenderError::SocketPath(p) => write!(
                f,
                "root: {} is too long a path for a unix socket (at most 107 bytes)",
                p.display()
            ),
            RenderError::NoPasswordFile(app) => {
                write!(f, "{app}: basic-auth has no password file")
            }
        }
    }
}

impl Error for RenderError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            RenderError::Template { source, .. } | RenderError::Render { source, .. } => {
                Some(&**source)
            }
            RenderError::Root { .. }
            | RenderError::SocketPath(_)
            | RenderError::NoPasswordFile(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_chain_down_to_the_io_error() {
        let e = NginxError::file(
            "/r/nginx/apps/a.conf",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(e.to_string().contains("/r/nginx/apps/a.conf"), "{e}");
        let io = e.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(io.and_then(io::Error::raw_os_error), Some(libc::ENOSPC));
        let e = NginxError::from(Unconfirmed::Start {
            binary: "/usr/sbin/nginx".into(),
            source: Arc::new(io::Error::from_raw_os_error(libc::ENOENT)),
        });
        let inner = e.source().unwrap();
        assert!(inner.to_string().contains("/usr/sbin/nginx"), "{inner}");
        assert!(
            inner
                .source()
                .unwrap()
                .downcast_ref::<io::Error>()
                .is_some()
        );
    }

    #[test]
    fn transient_from_the_type() {
        assert!(!NginxError::Rejected("bad".into()).transient());
        assert!(
            !NginxError::Render(RenderError::NoPasswordFile(AppName::new("a").unwrap()))
                .transient()
        );
        assert!(NginxError::Unconfirmed(Unconfirmed::Stopped).transient());
        assert!(
            NginxError::Foreign {
                file: "/etc/nginx/sites-enabled/x".into(),
                message: "m".into()
            }
            .transient()
        );
        assert!(NginxError::file("/r", io::Error::from_raw_os_error(libc::EACCES)).transient());
    }
}
