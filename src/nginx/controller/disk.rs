//! What keter's Nginx files on disk say, for a controller that starts where an earlier keter
//! left off: which bundle each app's file serves and to which ports, the generation written,
//! the apps' bounds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use super::write_atomic;
use crate::names::AppName;
use crate::nginx::Paths;

/// [`write_atomic`] unless the file holds `text` already; true when it was written.
pub(super) fn write_if_changed(path: &Path, text: &str) -> io::Result<bool> {
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    write_atomic(path, text).map(|()| true)
}

/// The longest `proxy_read_timeout` in the apps' files (the `connection-time-bound` each
/// stanza got), and `default` when no file has one; `None` when one has none (`365d`).
pub(super) fn longest_bound<'a>(
    apps: impl Iterator<Item = &'a String>,
    default: Option<Duration>,
) -> Option<Duration> {
    let mut longest = default;
    for text in apps {
        for value in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
        {
            let bound = value
                .trim_end_matches(';')
                .strip_suffix("ms")
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis);
            longest = match (longest, bound) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
    }
    longest
}

/// The generation in `generation.conf` as [`Renderer::generation_conf`] writes it.
pub(super) fn written_generation(text: &str) -> Option<u64> {
    text.split('"')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The text of each app's file in `apps/`, read once for a keter taking over from an earlier
/// one: what Nginx routes to ([`live_sha256`], [`upstream_ports`]).
pub fn live_files(paths: &Paths) -> BTreeMap<AppName, String> {
    let Ok(dir) = fs::read_dir(&paths.apps) else {
        return BTreeMap::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".conf")?.to_string();
            let app = AppName::new(&name).ok()?;
            Some((app, fs::read_to_string(e.path()).ok()?))
        })
        .collect()
}

/// The sha256 of the bundle an app's file serves, from its header.
pub fn live_sha256(text: &str) -> Option<String> {
    text.lines()
        .take(5)
        .find_map(|l| l.strip_prefix("# sha256 "))
        .map(|s| s.trim().to_string())
}

/// The local ports an app's file sends requests to: a keter taking over compares them with the
/// ports the app's record says, which differ when a webapp moved to another port and the keter
/// before it was killed before Nginx took the move.
pub fn upstream_ports(text: &str) -> BTreeSet<u16> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("server 127.0.0.1:")?
                .strip_suffix(';')?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nginx::Renderer;

    #[test]
    fn the_longest_bound_of_the_apps_files_and_none_when_one_has_none() {
        let bounded = |ms: u64| {
            format!(
                "server {{\n    location / {{\n        proxy_read_timeout {ms}ms;\n    }}\n}}\n"
            )
        };
        let (short, long) = (bounded(5000), bounded(60000));
        let default = Some(Duration::from_secs(300));
        assert_eq!(longest_bound([&short].into_iter(), default), default);
        assert_eq!(
            longest_bound([&short, &long].into_iter(), Some(Duration::from_secs(1))),
            Some(Duration::from_secs(60))
        );
        let none = "        proxy_read_timeout 365d;\n".to_string();
        assert_eq!(longest_bound([&long, &none].into_iter(), default), None);
        assert_eq!(longest_bound([].into_iter(), None), None);
        assert_eq!(written_generation(&Renderer::generation_conf(42)), Some(42));
    }

    #[test]
    fn the_ports_an_app_file_routes_to() {
        let text = "upstream keter-a-0 {\n    server 127.0.0.1:4001;\n    keepalive 32;\n}\nupstream keter-a-1 {\n    server 127.0.0.1:4007;\n}\nserver {\n    server_name a.example.com;\n}\n";
        assert_eq!(upstream_ports(text), BTreeSet::from([4001, 4007]));
    }
}
