//! The state journal, `ROOT/etc/processes`: the process groups keter runs, so that a keter
//! that was killed (SIGKILL, OOM) finds them when it starts again.
//!
//! Policy: leftover groups are stopped, not adopted, and the apps are deployed again from
//! `incoming/`. Adoption cannot be made safe here: an app's stdout and stderr are pipes whose
//! reading end died with the old keter, so the app gets SIGPIPE (or EPIPE) at its next line of
//! output, and keter could not wait for a process it did not start.
//!
//! The file is rewritten whole (temp file, fsync, rename) on every change, so it is never seen
//! half-written; if the disk is full the previous version stays and an error is logged.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{process, procfs};

/// One running process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The app it belongs to (for the log).
    pub app: String,
    /// When the group leader started, in clock ticks since boot (`/proc/PID/stat` field 22):
    /// tells a leftover leader from an unrelated process that got the same pid.
    pub start_ticks: u64,
}

/// The journal: one owner, shared by the app workers.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    groups: Mutex<BTreeMap<i32, Entry>>,
}

impl Journal {
    pub fn new(etc: &Path) -> Journal {
        Journal {
            path: etc.join("processes"),
            groups: Mutex::new(BTreeMap::new()),
        }
    }

    /// Stops the groups recorded by an earlier run that are still alive, then empties the
    /// journal. Returns how many groups were stopped.
    pub fn recover(&self, grace: Duration) -> usize {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                log::error!("journal: cannot read {}: {e}", self.path.display());
                return 0;
            }
        };
        let mut stopped = 0;
        for (pgid, entry) in parse(&text) {
            if !is_leftover(pgid, &entry) {
                continue;
            }
            log::warn!(
                "journal: {}: stopping process group {pgid} left by an earlier run of keter",
                entry.app
            );
            process::stop_group(pgid, grace);
            stopped += 1;
        }
        self.write(&BTreeMap::new());
        stopped
    }

    pub fn add(&self, pgid: i32, app: &str) {
        let Some(start_ticks) = procfs::start_ticks(pgid) else {
            return; // already gone
        };
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.insert(
            pgid,
            Entry {
                app: app.to_string(),
                start_ticks,
            },
        );
        self.write(&groups);
    }

    pub fn remove(&self, pgid: i32) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups.remove(&pgid).is_some() {
            self.write(&groups);
        }
    }

    fn write(&self, groups: &BTreeMap<i32, Entry>) {
        let mut text = String::from(
            "# keter state journal: process groups of running apps (pgid start-ticks app)\n",
        );
        for (pgid, e) in groups {
            text.push_str(&format!("{pgid} {} {}\n", e.start_ticks, e.app));
        }
        if let Err(e) = crate::atomic_file::replace(&self.path, text.as_bytes(), 0o644) {
            log::error!("journal: cannot write {}: {e}", self.path.display());
        }
    }
}

fn parse(text: &str) -> Vec<(i32, Entry)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let pgid = parts.next()?.parse().ok()?;
            let start_ticks = parts.next()?.parse().ok()?;
            let app = parts.next()?.to_string();
            Some((pgid, Entry { app, start_ticks }))
        })
        .collect()
}

/// True when group `pgid` still has members from the recorded run: the leader itself (same
/// start time), or, with the leader gone, any member (a process group id cannot be reused
/// while a member of the group lives).
fn is_leftover(pgid: i32, entry: &Entry) -> bool {
    let members = procfs::group_members(pgid);
    if members.is_empty() {
        return false;
    }
    match procfs::start_ticks(pgid) {
        Some(ticks) if members.contains(&pgid) => ticks == entry.start_ticks,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_recovery_of_a_real_group() {
        let dir = std::env::temp_dir().join(format!("keter-journal-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut child = process::command_in_new_group(Path::new("sleep"))
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let journal = Journal::new(&dir);
        journal.add(pid, "app-a");
        let text = fs::read_to_string(dir.join("processes")).unwrap();
        assert_eq!(parse(&text)[0].0, pid);
        assert_eq!(parse(&text)[0].1.app, "app-a");

        // A new journal (a restarted keter) stops the group it finds.
        let again = Journal::new(&dir);
        assert_eq!(again.recover(Duration::from_secs(2)), 1);
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert_eq!(
            parse(&fs::read_to_string(dir.join("processes")).unwrap()).len(),
            0
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reused_pid_is_not_a_leftover() {
        let me = std::process::id() as i32;
        let entry = Entry {
            app: "x".into(),
            start_ticks: 1,
        };
        // This test process is not the leader of a group with id `me` started at tick 1.
        if procfs::group_members(me).contains(&me) {
            assert!(!is_leftover(me, &entry));
        }
        assert!(!is_leftover(i32::MAX, &entry));
    }
}
