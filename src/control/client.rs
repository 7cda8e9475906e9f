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
