//! Why isolation could not do what it was asked (README "Security"): each value names the
//! folder, the user and the permission concerned, and keeps the error of the system call
//! underneath as its source.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::access::Denied;
use crate::names::AppName;
use crate::process::UserError;

#[derive(Debug)]
pub enum IsolationError {
    /// `what` ("cannot create", "cannot set the mode of", ...) failed on `path`; an empty
    /// `what` for looking at it.
    File {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A folder of the root's layout is something else.
    NotAFolder(PathBuf),
    /// A line of the app users' records is not `APP USER UID GID`.
    Records {
        path: PathBuf,
        line: usize,
        text: String,
    },
    /// A user cannot be looked up (Nginx's workers' user, an app's user).
    User(UserError),
    /// `useradd` could not be run.
    UseraddSpawn { user: String, source: io::Error },
    /// `useradd` ran and failed; `stderr` is what it said.
    Useradd {
        user: String,
        app: AppName,
        stderr: String,
    },
    /// `useradd` succeeded and the system does not know the user.
    UserVanished(String),
    /// Both names an app's user may have belong to users keter did not create.
    NoFreeName {
        app: AppName,
        names: Vec<String>,
        root: PathBuf,
    },
    /// keter is not root (`uid`) and `run-apps-as-root` asks for root.
    NotRootForRoot { uid: u32 },
    /// keter is not root (`uid`) and `setuid` names another user.
    NotRootForUser {
        uid: u32,
        user: String,
        user_uid: u32,
    },
    /// The `setuid` user could write or read keter's state: `breaches` says what.
    SharedUserBreaches { user: String, breaches: Vec<String> },
    /// An app's user could write or read keter's state.
    AppUserBreaches { user: String, breaches: Vec<String> },
    /// What `user` may reach cannot be checked (the checking thread failed).
    Check { user: String, source: io::Error },
    /// Static roots are to be opened to Nginx's workers, and no worker says who they are.
    NoWorkers,
    /// The unpacked folder `dir` cannot be given to `user`.
    HandOver {
        dir: PathBuf,
        user: String,
        source: io::Error,
    },
    /// The app's user (`ids`, as shown) cannot reach its folder.
    Unreachable { ids: String, denied: Denied },
    /// Nginx's workers (`workers`, as shown) cannot read a static root.
    UnreadableRoot {
        root: PathBuf,
        workers: String,
        denied: Denied,
    },
}

impl IsolationError {
    /// The I/O error underneath, if the failure is one (`src/app/error.rs` decides from it
    /// whether a deploy is tried again).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            IsolationError::File { source, .. }
            | IsolationError::UseraddSpawn { source, .. }
            | IsolationError::Check { source, .. }
            | IsolationError::HandOver { source, .. } => Some(source),
            _ => None,
        }
    }

    pub(crate) fn file<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(io::Error) -> IsolationError + 'a {
        move |source| IsolationError::File {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for IsolationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsolationError::File {
                what: "",
                path,
                source,
            } => write!(f, "{}: {source}", path.display()),
            IsolationError::File { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            IsolationError::NotAFolder(path) => write!(f, "{} is not a folder", path.display()),
            IsolationError::Records { path, line, text } => write!(
                f,
                "{}: line {line}: expected APP USER UID GID, found {text:?}",
                path.display()
            ),
            IsolationError::User(e) => write!(f, "{e}"),
            IsolationError::UseraddSpawn { user, source } => {
                write!(f, "cannot run useradd to create the user {user}: {source}")
            }
            IsolationError::Useradd { user, app, stderr } => write!(
                f,
                "useradd could not create the user {user} for the app {app}: {stderr}"
            ),
            IsolationError::UserVanished(user) => {
                write!(f, "useradd created {user}, but the system does not know it")
            }
            IsolationError::NoFreeName { app, names, root } => write!(
                f,
                "no user name is free for the app {app}: {} are all taken by users keter did \
                 not create for {}",
                names.join(" and "),
                root.display()
            ),
            IsolationError::NotRootForRoot { uid } => write!(
                f,
                "run-apps-as-root: keter runs as uid {uid}, not as root, and cannot run apps as root"
            ),
            IsolationError::NotRootForUser {
                uid,
                user,
                user_uid,
            } => write!(
                f,
                "setuid: keter runs as uid {uid}, not as root, and cannot run apps as {user} (uid {user_uid})"
            ),
            IsolationError::SharedUserBreaches { user, breaches } => write!(
                f,
                "setuid: apps would run as {user}, who {}; choose a user that is not a deployer \
                 or operator (README \"Security\")",
                breaches.join(", ")
            ),
            IsolationError::AppUserBreaches { user, breaches } => write!(
                f,
                "the app's user {user} {}; fix the modes of those folders",
                breaches.join(", ")
            ),
            IsolationError::Check { user, source } => {
                write!(f, "cannot check what {user} may reach: {source}")
            }
            IsolationError::NoWorkers => f.write_str(
                "cannot tell which user Nginx's workers run as (no worker process found), so \
                 the static roots cannot be opened to them",
            ),
            IsolationError::HandOver { dir, user, source } => {
                write!(f, "cannot give {} to {user}: {source}", dir.display())
            }
            IsolationError::Unreachable { ids, denied } => write!(
                f,
                "the app's user ({ids}) cannot reach its folder: {}",
                denied.describe()
            ),
            IsolationError::UnreadableRoot {
                root,
                workers,
                denied,
            } => write!(
                f,
                "the static root {} is not readable by Nginx's workers ({workers}): {}",
                root.display(),
                denied.describe()
            ),
        }
    }
}

impl std::error::Error for IsolationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IsolationError::User(e) => Some(e),
            IsolationError::Unreachable { denied, .. }
            | IsolationError::UnreadableRoot { denied, .. } => Some(&denied.error),
            _ => self.io_error().map(|e| e as _),
        }
    }
}
