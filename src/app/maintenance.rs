//! An app in maintenance (`keter maintenance NAME on`, README "Releases and rollback"): Nginx
//! answers its hosts with 503, `Retry-After` and the operator's page while the app keeps
//! running. The app's worker owns the state and keeps it in `ROOT/etc/maintenance/NAME.json`,
//! so that a keter started again or upgraded in place renders the app's site the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::AppName;

/// Maintenance turned on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The operator's message, shown on the page (as text).
    pub message: Option<String>,
    /// When it was turned on (RFC 3339), and by whom.
    pub since: String,
    pub by: u32,
}

fn path(root: &Path, app: &AppName) -> PathBuf {
    root.join("etc")
        .join("maintenance")
        .join(format!("{app}.json"))
}

/// The state a keter kept before; none when the file is missing or unreadable (logged).
pub fn load(root: &Path, app: &AppName) -> Option<Maintenance> {
    let path = path(root, app);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::error!("{app}: cannot read {}: {e}", path.display());
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            log::error!(
                "{app}: {} is not a maintenance state: {e}; the app is not in maintenance",
                path.display()
            );
            None
        }
    }
}

/// Keeps the state (`None`: removes the file).
pub fn save(root: &Path, app: &AppName, m: Option<&Maintenance>) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let path = path(root, app);
    match m {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(m) => {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            let text = serde_json::to_vec(m).map_err(std::io::Error::other)?;
            crate::atomic_file::replace(&path, &text, 0o600)
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// The page Nginx answers with: the operator's message, HTML-escaped.
pub fn page(app: &AppName, m: &Maintenance) -> String {
    let message =
        m.message.as_deref().map(escape).unwrap_or_else(|| {
            "This site is down for maintenance. Please try again shortly.".into()
        });
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>Down for maintenance</title></head>\n<body style=\"font-family: sans-serif; max-width: 40em; margin: 4em auto; padding: 0 1em\">\n<h1>Down for maintenance</h1>\n<p id=\"message\">{message}</p>\n<!-- keter: {app} -->\n</body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_shown_as_text() {
        let m = Maintenance {
            message: Some("<script>alert(1)</script> & \"soon\"\u{1b}[31m".into()),
            since: "t".into(),
            by: 0,
        };
        let p = page(&AppName::new("blog").unwrap(), &m);
        assert!(
            p.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;soon&quot;[31m"),
            "{p}"
        );
        assert!(!p.contains("<script>"));
    }
}
