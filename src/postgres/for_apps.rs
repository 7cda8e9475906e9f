//! Which way to the server an app is given (README, "PostgreSQL plugin"): for a server on this
//! machine, its socket folder when the app's role can log in there with its password, else the
//! TCP address keter checked, with a warning once per app and run saying what to change.
//!
//! keter checks the listener at each of its own connections; an app's driver checks nothing,
//! and reconnects whenever the server restarts, which is when any local process may take a TCP
//! port. A socket folder that only root and the server's user may write cannot be taken, so
//! that is the way apps are sent where they can use it.

use std::path::PathBuf;

use super::listener::{self, Route};
use super::session::{Login, Session};
use super::{Credentials, PgError, Provisioner, Server, describe, open_session};
use crate::names::AppName;

/// Why an app is not given the socket folder.
enum NoSocket {
    /// The admin role may not read `unix_socket_directories`.
    NotAllowed(String),
    /// The settings could not be read for another reason.
    Settings(String),
    /// No folder of the server is safe for apps: each with why.
    NoFolder(Vec<String>),
    /// The app's role cannot log in over the socket with its password.
    Login {
        folder: PathBuf,
        message: String,
        hba_file: Option<String>,
    },
}

impl Provisioner {
    /// The server an app gets (module doc). Never fails the deploy: TCP always works, since
    /// keter has just used it.
    pub(super) fn server_for_app(
        &self,
        app: &AppName,
        admin: &mut Session,
        route: &Route,
        creds: &Credentials,
    ) -> Server {
        let tcp = match route {
            // Configured as a socket folder (the apps get it, as before), or on another
            // machine, which keter cannot check: as configured.
            Route::Socket(_) | Route::Remote(_) => return self.admin.server.clone(),
            Route::Local(addr) => match Server::new(&addr.ip().to_string(), addr.port()) {
                Ok(s) => s,
                Err(_) => return self.admin.server.clone(),
            },
        };
        match self.socket_for_app(admin, creds) {
            Ok(server) => server,
            Err(why) => {
                self.warn_once(app, creds, &tcp, why);
                tcp
            }
        }
    }

    fn socket_for_app(&self, admin: &mut Session, creds: &Credentials) -> Result<Server, NoSocket> {
        let row = admin
            .query_one(
                "SELECT current_setting('unix_socket_directories'), current_setting('port')::int, current_setting('hba_file')",
                &[],
            )
            .map_err(|e| {
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                    NoSocket::NotAllowed(describe(&e))
                } else {
                    NoSocket::Settings(describe(&e))
                }
            })?;
        let (folders, port, hba_file): (String, i32, String) = (row.get(0), row.get(1), row.get(2));
        let port = u16::try_from(port)
            .map_err(|_| NoSocket::Settings(format!("the server's port {port} is not a port")))?;
        let trust = self.trust();
        let mut refused = Vec::new();
        let folder = socket_folders(&folders).into_iter().find_map(|f| {
            match listener::check_app_socket(&f, port, &trust) {
                Ok(_) => Some(f),
                Err(why) => {
                    refused.push(why.to_string());
                    None
                }
            }
        });
        let Some(folder) = folder else {
            if refused.is_empty() {
                refused.push(format!(
                    "its unix_socket_directories ({folders:?}) names no folder"
                ));
            }
            return Err(NoSocket::NoFolder(refused));
        };
        let server = Server::new(&folder.display().to_string(), port)
            .map_err(|e| NoSocket::NoFolder(vec![e.to_string()]))?;
        // What the app will do: log in as its role, with its password, to its database.
        let login = Login {
            user: creds.role.as_str(),
            password: Some(&creds.password),
            database: creds.database.as_str(),
        };
        match open_session(&server, &trust, &login) {
            Ok(_) => Ok(server),
            Err(e) => Err(NoSocket::Login {
                folder,
                message: match e {
                    PgError::Connect { message, .. } | PgError::Untrusted { message, .. } => {
                        message
                    }
                    other => other.to_string(),
                },
                hba_file: Some(hba_file).filter(|f| !f.is_empty()),
            }),
        }
    }

    /// Says once per app in this run why it gets TCP, and what would give it the socket.
    fn warn_once(&self, app: &AppName, creds: &Credentials, tcp: &Server, why: NoSocket) {
        let first = self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app.clone());
        if !first {
            return;
        }
        let risk = format!(
            "the app is given TCP ({tcp}) instead, where a process of this machine that takes the port while PostgreSQL is down or restarting would receive the app's password"
        );
        let admin = &self.admin.user;
        match why {
            NoSocket::NotAllowed(e) => log::warn!(
                "{app}: keter cannot ask the server for its socket folder ({e}); {risk}. To give apps the socket, run `GRANT pg_read_all_settings TO {admin}` as a superuser"
            ),
            NoSocket::Settings(e) => {
                log::warn!("{app}: keter cannot read the server's socket folder ({e}); {risk}")
            }
            NoSocket::NoFolder(reasons) => log::warn!(
                "{app}: the server has no socket folder apps may be given ({}); {risk}. Give the server a socket folder that only root and its user may write (unix_socket_directories)",
                reasons.join("; ")
            ),
            NoSocket::Login {
                folder,
                message,
                hba_file,
            } => log::warn!(
                "{app}: the app's role {} cannot log in with its password over the socket in {} ({message}); {risk}. To give it the socket, add the line `local {} {} scram-sha-256` to {} above the line `local all all peer`, and reload PostgreSQL; the app's next deploy takes it",
                creds.role,
                folder.display(),
                creds.database,
                creds.role,
                hba_file.as_deref().unwrap_or("pg_hba.conf"),
            ),
        }
    }
}

/// The absolute folders of a `unix_socket_directories` value: a comma-separated list whose
/// entries may be double-quoted (a quote doubled inside); abstract sockets (`@name`) and
/// relative paths are left out.
fn socket_folders(value: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entry = String::new();
    let mut quoted = false;
    let mut chars = value.chars().peekable();
    let mut push = |entry: &mut String| {
        let e = entry.trim();
        if e.starts_with('/') {
            out.push(PathBuf::from(e));
        }
        entry.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                entry.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => push(&mut entry),
            c => entry.push(c),
        }
    }
    push(&mut entry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_folder_lists_are_read_as_the_server_writes_them() {
        assert_eq!(
            socket_folders("/var/run/postgresql"),
            [PathBuf::from("/var/run/postgresql")]
        );
        assert_eq!(
            socket_folders("/run/a, \"/run/b, c\" ,@abstract,relative, /tmp"),
            [
                PathBuf::from("/run/a"),
                PathBuf::from("/run/b, c"),
                PathBuf::from("/tmp")
            ]
        );
        assert_eq!(socket_folders("\"/x\"\"y\""), [PathBuf::from("/x\"y")]);
        assert!(socket_folders("").is_empty());
    }
}
