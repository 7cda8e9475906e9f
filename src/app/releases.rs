//! An app's releases (README "Releases and rollback"): every version switched to, newest
//! last, with its bundle kept under `ROOT/releases/NAME/SHA256.keter` (content-addressed: a
//! version deployed again, or rolled back to, shares its file) for the last `keep-releases`
//! of them. The app's worker owns the list: it adds a release at each switch to another
//! bundle, marks how the one before ended, and writes `ROOT/releases/NAME/releases.json`
//! (through `Effects::write_releases`), so that a keter started again or upgraded in place
//! reads the same list. The copy of a bundle is made from the descriptor the deploy read
//! (`deploy.rs`, `keep_bundle`), never from the path in `incoming/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::AppName;

/// The format of `releases.json`.
pub const FORMAT: u32 = 1;

/// How a release stopped being the one serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ended {
    /// A newer bundle was switched to.
    Replaced,
    /// An operator rolled it back (`keter rollback`): marked bad.
    RolledBack,
    /// It failed after its switch and keter rolled it back by itself.
    FailedAfterSwitch,
}

/// One release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Counted from 1 for each app, never reused.
    pub number: u64,
    pub sha256: String,
    /// Bytes of the bundle file.
    pub size: u64,
    /// When it was switched to (RFC 3339).
    pub deployed_at: String,
    /// The uid that owned the bundle file in `incoming/` (root for a rollback, which keter
    /// puts there itself), and its user name when it has one.
    pub deployed_by: u32,
    #[serde(default)]
    pub deployed_by_user: Option<String>,
    /// The release this one deployed again, for a rollback.
    #[serde(default)]
    pub rollback_of: Option<u64>,
    /// How it stopped serving; `None` while it serves (the newest only).
    #[serde(default)]
    pub ended: Option<Ended>,
    #[serde(default)]
    pub ended_at: Option<String>,
    /// Why, when keter or an operator ended it (a rollback).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What a new release is made from, at its switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub sha256: String,
    pub size: u64,
    pub owner: u32,
    pub owner_name: Option<String>,
    /// Rolled back to this release, by an operator, or by keter for the reason given.
    pub rollback: Option<Rollback>,
}

/// A deploy that is a rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    pub to: u64,
    /// The content of release `to`: a file that another took the place of in `incoming/`
    /// before the deploy read it is no rollback.
    pub sha256: String,
    pub how: Ended,
    pub reason: String,
}

/// The releases of one app, oldest first; at most `keep-releases` are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releases {
    pub format: u32,
    pub releases: Vec<Release>,
    /// The number the next release gets.
    pub next: u64,
}

impl Releases {
    /// The folder of an app's releases.
    pub fn dir(root: &Path, app: &AppName) -> PathBuf {
        root.join("releases").join(app.as_str())
    }

    /// The kept bundle of a release.
    pub fn bundle(root: &Path, app: &AppName, sha256: &str) -> PathBuf {
        Releases::dir(root, app).join(format!("{sha256}.keter"))
    }

    /// Reads the list a keter wrote before (an empty one when there is none; a file that
    /// cannot be read is logged and the list starts again, the bundles staying on disk until
    /// the next write prunes them).
    pub fn load(root: &Path, app: &AppName) -> Releases {
        let path = Releases::dir(root, app).join("releases.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Releases::default(),
            Err(e) => {
                log::error!("{app}: cannot read {}: {e}", path.display());
                return Releases::default();
            }
        };
        match serde_json::from_slice::<Releases>(&text) {
            Ok(r) if r.format <= FORMAT => r,
            Ok(r) => {
                log::error!(
                    "{app}: {} is of format {}, newer than this keter's {FORMAT}: its releases are not listed",
                    path.display(),
                    r.format
                );
                Releases::default()
            }
            Err(e) => {
                log::error!("{app}: {} is not a list of releases: {e}", path.display());
                Releases::default()
            }
        }
    }

    /// The release serving (the newest, unless it ended).
    pub fn current(&self) -> Option<&Release> {
        self.releases.last().filter(|r| r.ended.is_none())
    }

    pub fn get(&self, number: u64) -> Option<&Release> {
        self.releases.iter().find(|r| r.number == number)
    }

    /// The release a rollback goes back to without a number: the newest before the serving
    /// one with another bundle, that was not itself rolled back.
    pub fn previous(&self) -> Option<&Release> {
        let current = self.current()?;
        self.releases.iter().rev().skip(1).find(|r| {
            r.sha256 != current.sha256
                && !matches!(r.ended, Some(Ended::RolledBack | Ended::FailedAfterSwitch))
        })
    }

    /// A version was switched to: a new release unless it is the serving release's bundle (a
    /// restart); the one before is marked as it ended. Keeps the newest `keep`. True when the
    /// list changed.
    pub fn switched(&mut self, arrival: Arrival, at: String, keep: usize) -> bool {
        let mut arrival = arrival;
        if arrival
            .rollback
            .as_ref()
            .is_some_and(|r| r.sha256 != arrival.sha256)
        {
            arrival.rollback = None;
        }
        if self
            .current()
            .is_some_and(|c| c.sha256 == arrival.sha256 && arrival.rollback.is_none())
        {
            return false;
        }
        if self.next == 0 {
            self.next = self.releases.iter().map(|r| r.number).max().unwrap_or(0) + 1;
        }
        if let Some(last) = self.releases.last_mut()
            && last.ended.is_none()
        {
            let (how, reason) = match &arrival.rollback {
                Some(r) => (r.how, Some(r.reason.clone())),
                None => (Ended::Replaced, None),
            };
            last.ended = Some(how);
            last.ended_at = Some(at.clone());
            last.reason = reason;
        }
        self.releases.push(Release {
            number: self.next,
            sha256: arrival.sha256,
            size: arrival.size,
            deployed_at: at,
            deployed_by: arrival.owner,
            deployed_by_user: arrival.owner_name,
            rollback_of: arrival.rollback.map(|r| r.to),
            ended: None,
            ended_at: None,
            reason: None,
        });
        self.next += 1;
        self.format = FORMAT;
        let keep = keep.max(1);
        if self.releases.len() > keep {
            let extra = self.releases.len() - keep;
            self.releases.drain(..extra);
        }
        true
    }

    /// Bytes on disk of the kept bundles (each file counted once).
    pub fn bytes(&self) -> u64 {
        let mut seen = std::collections::BTreeSet::new();
        self.releases
            .iter()
            .filter(|r| seen.insert(r.sha256.as_str()))
            .map(|r| r.size)
            .sum()
    }

    /// Whether a bundle of this content is kept.
    pub fn keeps(&self, sha256: &str) -> bool {
        self.releases.iter().any(|r| r.sha256 == sha256)
    }
}

/// Writes `releases.json` into `dir` (atomically, root's only) and deletes the kept bundles
/// that no release of the list names any more. Runs on the worker's thread at a switch, when
/// no unpack of the app is in flight, so no bundle being kept is deleted.
pub fn write(dir: &Path, releases: &Releases) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    write_list(dir, releases)
}

fn write_list(dir: &Path, releases: &Releases) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(releases).map_err(std::io::Error::other)?;
    crate::atomic_file::replace(&dir.join("releases.json"), &text, 0o600)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(sha) = name.strip_suffix(".keter")
            && !name.starts_with('.')
            && !releases.keeps(sha)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Copies the kept bundle `from` to `path` in `incoming/`, a folder the deployers may write:
/// written under a hidden name (which the daemon ignores, README "How a deploy works") created
/// anew, never through a link, given to `owner`, then renamed over `NAME.keter` at once.
pub fn place(from: &Path, owner: u32, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.rollback-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let done = std::io::copy(&mut src, &mut out)
        .and_then(|_| out.sync_data())
        .and_then(|()| {
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::fchown(&out, Some(owner), None)
            } else {
                Ok(())
            }
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(sha: &str) -> Arrival {
        Arrival {
            sha256: sha.into(),
            size: 10,
            owner: 1000,
            owner_name: Some("alice".into()),
            rollback: None,
        }
    }

    #[test]
    fn each_switch_to_another_bundle_is_a_release_and_the_oldest_go() {
        let mut r = Releases::default();
        assert!(r.switched(arrival("a"), "t1".into(), 2));
        assert!(
            !r.switched(arrival("a"), "t2".into(), 2),
            "a restart is no release"
        );
        assert!(r.switched(arrival("b"), "t3".into(), 2));
        assert_eq!(r.releases[0].ended, Some(Ended::Replaced));
        assert_eq!(r.current().unwrap().number, 2);
        assert_eq!(r.previous().unwrap().sha256, "a");
        assert!(r.switched(arrival("c"), "t4".into(), 2));
        let numbers: Vec<u64> = r.releases.iter().map(|r| r.number).collect();
        assert_eq!(numbers, [2, 3]);
        assert!(!r.keeps("a"));
        assert_eq!(r.bytes(), 20);
    }

    #[test]
    fn a_rollback_marks_the_bad_release_and_is_a_release_of_its_own() {
        let mut r = Releases::default();
        r.switched(arrival("a"), "t1".into(), 5);
        r.switched(arrival("b"), "t2".into(), 5);
        let mut back = arrival("a");
        back.rollback = Some(Rollback {
            to: 1,
            sha256: "a".into(),
            how: Ended::RolledBack,
            reason: "asked by uid 0".into(),
        });
        r.switched(back, "t3".into(), 5);
        assert_eq!(r.releases[1].ended, Some(Ended::RolledBack));
        assert_eq!(r.current().unwrap().rollback_of, Some(1));
        // The bad release is not where a rollback goes next, and the same bundle counts once.
        assert!(r.previous().is_none());
        assert_eq!(r.bytes(), 20);
        // Copying the bad bundle in again is an operator's explicit act: a new release.
        assert!(r.switched(arrival("b"), "t4".into(), 5));
        assert_eq!(r.current().unwrap().number, 4);
    }

    #[test]
    fn the_list_reads_back_as_written() {
        let mut r = Releases::default();
        r.switched(arrival("a"), "t1".into(), 5);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Releases>(&text).unwrap(), r);
    }
}
