//! Lexical path normalisation, shared by the configuration, the `status` key and bundle paths.

use std::path::{Component, Path, PathBuf};

/// Lexically removes `.` and `..` so that messages and Nginx files show plain paths.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
