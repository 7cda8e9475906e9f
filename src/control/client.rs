//! The command line's side of the control socket: one request, one answer.

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{Answer, Request};

/// Why a request got no answer from the daemon.
#[derive(Debug)]
pub enum AskError {
    /// The socket exists but this user may not use it (not root, not a deployer).
    NotAllowed {
        socket: PathBuf,
        incoming: PathBuf,
        source: io::Error,
    },
    /// No keter listens on the socket (or it is not there).
    Unreachable {
        socket: PathBuf,
        root: PathBuf,
        source: io::Error,
    },
    /// The connection broke while the request or the answer went over it.
    Talk { socket: PathBuf, source: io::Error },
    /// The daemon closed the connection without answering.
    NoAnswer { socket: PathBuf },
    /// What came back is not an answer.
    NotAnAnswer(serde_json::Error),
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::NotAllowed {
                socket,
                incoming,
                source,
            } => write!(
                f,
                "cannot use keter's control socket {}: {source}: only root and the deployers \
                 (who may write {}) may",
                socket.display(),
                incoming.display()
            ),
            AskError::Unreachable {
                socket,
                root,
                source,
            } => write!(
                f,
                "cannot reach keter's control socket {}: {source} (is keter running on {}?)",
                socket.display(),
                root.display()
            ),
            AskError::Talk { socket, source } => {
                write!(f, "talking to keter over {}: {source}", socket.display())
            }
            AskError::NoAnswer { socket } => {
                write!(f, "keter closed {} without an answer", socket.display())
            }
            AskError::NotAnAnswer(e) => {
                write!(f, "keter answered something that is not an answer: {e}")
            }
        }
    }
}

impl std::error::Error for AskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AskError::NotAllowed { source, .. }
            | AskError::Unreachable { source, .. }
            | AskError::Talk { source, .. } => Some(source),
            AskError::NoAnswer { .. } => None,
            AskError::NotAnAnswer(e) => Some(e),
        }
    }
}

/// Sends `request` to the keter running on `root` and waits for its answer (a restart takes
/// as long as the new processes take to become ready and be switched to).
pub fn ask(root: &Path, request: &Request) -> Result<Answer, AskError> {
    let socket = super::socket_path(root);
    let mut stream = UnixStream::connect(&socket).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => AskError::NotAllowed {
            socket: socket.clone(),
            incoming: root.join("incoming"),
            source,
        },
        _ => AskError::Unreachable {
            socket: socket.clone(),
            root: root.to_path_buf(),
            source,
        },
    })?;
    // A request is plain data: it always serialises.
    let mut line = serde_json::to_vec(request).expect("a request serialises");
    line.push(b'\n');
    let talk = |source: io::Error| AskError::Talk {
        socket: socket.clone(),
        source,
    };
    stream.write_all(&line).map_err(talk)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(talk)?;
    if answer.is_empty() {
        return Err(AskError::NoAnswer { socket });
    }
    serde_json::from_str(answer.trim_end()).map_err(AskError::NotAnAnswer)
}

/// `keter releases NAME` for people: one line per release, newest first, then the disk the
/// kept bundles take. Whatever came from the daemon is printed with its control characters
/// written out.
pub fn releases_table(data: &serde_json::Value) -> String {
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::String(s) => crate::applog::printable(s).into_owned(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut out = format!(
        "{:<8} {:<12} {:>10} {:<21} {:<20} {}\n",
        "RELEASE", "SHA256", "BYTES", "DEPLOYED", "BY", "ENDED"
    );
    let releases = data
        .get("releases")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for r in releases.iter().rev() {
        let sha = text(&r["sha256"]);
        let by = match (&r["deployed_by_user"], &r["deployed_by"]) {
            (Value::String(u), uid) => format!("{} ({uid})", crate::applog::printable(u)),
            (_, uid) => format!("uid {uid}"),
        };
        let mut ended = match &r["ended"] {
            Value::Null => "serving".to_string(),
            v => format!("{} {}", text(v), text(&r["ended_at"])),
        };
        if let Value::Number(n) = &r["rollback_of"] {
            ended.push_str(&format!(" (rollback to release {n})"));
        }
        if let Value::String(why) = &r["reason"] {
            ended.push_str(&format!(": {}", crate::applog::printable(why)));
        }
        out.push_str(&format!(
            "{:<8} {:<12} {:>10} {:<21} {:<20} {ended}\n",
            text(&r["number"]),
            sha.get(..12).unwrap_or(&sha),
            text(&r["size"]),
            text(&r["deployed_at"]),
            by
        ));
    }
    out.push_str(&format!(
        "{} releases kept, {} bytes of bundles\n",
        releases.len(),
        text(&data["releases_bytes"])
    ));
    out
}
