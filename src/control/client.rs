//! The command line's side of the control socket: one request, one answer.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::{Answer, Request};

/// Sends `request` to the keter running on `root` and waits for its answer (a restart takes
/// as long as the new processes take to become ready and be switched to).
pub fn ask(root: &Path, request: &Request) -> Result<Answer, String> {
    let path = super::socket_path(root);
    let mut stream = UnixStream::connect(&path).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "cannot use keter's control socket {}: {e}: only root and the deployers (who may \
             write {}) may",
            path.display(),
            root.join("incoming").display()
        ),
        _ => format!(
            "cannot reach keter's control socket {}: {e} (is keter running on {}?)",
            path.display(),
            root.display()
        ),
    })?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let talk = |e: io::Error| format!("talking to keter over {}: {e}", path.display());
    stream.write_all(&line).map_err(talk)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(talk)?;
    if answer.is_empty() {
        return Err(format!("keter closed {} without an answer", path.display()));
    }
    serde_json::from_str(answer.trim_end())
        .map_err(|e| format!("keter answered something that is not an answer: {e}"))
}
