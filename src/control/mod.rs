//! The control socket (README "Running keter", "Security"): the commands that change what the
//! running daemon does (`keter restart`, ...) reach it here, never through the status
//! interface, which stays read-only. A unix socket `ROOT/control.sock`, mode 0660 with the
//! group of `incoming/` (the deployers'), so that whoever may deploy a bundle may also ask
//! for these; every connection's peer is checked again when it is accepted (`access.rs`) and
//! each request is logged with the uid that asked.
//!
//! One request per connection: a line of JSON ([`Request`]), answered with a line of JSON
//! ([`Answer`]) once the daemon has done it.

pub mod access;
pub mod client;
pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use server::ControlServer;

/// The control socket of the keter running on `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("control.sock")
}

/// What an operator asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Fresh processes of the serving version of `app`, switched in as a deploy is.
    Restart { app: String },
    /// Deploy release `release` of `app` again, or the one before the serving release.
    Rollback {
        app: String,
        #[serde(default)]
        release: Option<u64>,
    },
    /// The releases of `app` (answered from the reports, without the app's worker).
    Releases { app: String },
    /// Maintenance of `app` on (with the operator's message) or off.
    Maintenance {
        app: String,
        on: bool,
        #[serde(default)]
        message: Option<String>,
    },
}

impl Request {
    /// The app the request is about.
    pub fn app(&self) -> &str {
        match self {
            Request::Restart { app }
            | Request::Rollback { app, .. }
            | Request::Releases { app }
            | Request::Maintenance { app, .. } => app,
        }
    }

    /// What the log says was asked.
    pub fn describe(&self) -> String {
        match self {
            Request::Restart { app } => format!("restart {app}"),
            Request::Rollback { app, release } => match release {
                Some(n) => format!("rollback {app} to release {n}"),
                None => format!("rollback {app}"),
            },
            Request::Releases { app } => format!("releases {app}"),
            Request::Maintenance { app, on, .. } => {
                format!("maintenance {app} {}", if *on { "on" } else { "off" })
            }
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
    /// What a listing answers (`releases`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Answer {
    pub fn of(outcome: crate::app::Outcome) -> Answer {
        match outcome {
            Ok(message) => Answer {
                ok: true,
                message,
                data: None,
            },
            Err(refusal) => Answer {
                ok: false,
                message: refusal.to_string(),
                data: None,
            },
        }
    }
}

/// A request that reached the daemon's loop, from a peer the socket let in.
#[derive(Debug)]
pub struct Asked {
    pub request: Request,
    pub uid: u32,
    /// Where the daemon, or the app's worker, answers.
    pub reply: crate::app::Reply,
}
