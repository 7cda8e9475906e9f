//! keter's state on disk, under `ROOT/etc`, so that a keter started later (an in-place upgrade,
//! or a start after this one was killed by SIGKILL, the OOM killer or a panic) finds what runs:
//!
//! * `processes`: every process group keter runs, with its leader's start time, rewritten at
//!   every start and stop of a group. A keter that starts stops every group listed there that
//!   it does not take over, so that nothing is left running unknown.
//! * `state/NAME.json`: each app's record (`src/app/record.rs`), written by the app's worker
//!   whenever it changes: what a later keter needs to take the app over without restarting it.
//!
//! Both are replaced whole (temp file, rename), so they are never seen half-written. The
//! records are not synced to the disk: they serve a keter started again on the same boot,
//! which finds them in the page cache; after a reboot no app process is left to take over.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::names::AppName;
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

/// A write of the journal's thread.
type Job = Box<dyn FnOnce() + Send>;

/// The journal: one owner, shared by the app workers.
pub struct Journal {
    path: PathBuf,
    /// `etc/state`: one record per app.
    records: PathBuf,
    groups: Mutex<BTreeMap<i32, Entry>>,
    /// The thread that writes the records.
    writer: OnceLock<Option<crossbeam_channel::Sender<Job>>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    pub fn new(etc: &Path) -> Journal {
        Journal {
            path: etc.join("processes"),
            records: etc.join("state"),
            groups: Mutex::new(BTreeMap::new()),
            writer: OnceLock::new(),
        }
    }

    /// The groups recorded by an earlier run (they may be gone).
    pub fn earlier_groups(&self) -> BTreeMap<i32, Entry> {
        match fs::read_to_string(&self.path) {
            Ok(text) => parse(&text).into_iter().collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                log::error!("journal: cannot read {}: {e}", self.path.display());
                BTreeMap::new()
            }
        }
    }

    /// Stops the groups recorded by an earlier run that are still alive, except those in
    /// `adopted` (taken over, their leaders' start times checked), which stay in the journal.
    /// Returns how many groups were stopped.
    pub fn recover(&self, adopted: &BTreeSet<i32>, grace: Duration) -> usize {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                log::error!("journal: cannot read {}: {e}", self.path.display());
                return 0;
            }
        };
        let mut stopped = 0;
        let mut kept = BTreeMap::new();
        for (pgid, entry) in parse(&text) {
            if adopted.contains(&pgid) {
                kept.insert(pgid, entry);
                continue;
            }
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
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.extend(kept);
        self.write(&groups);
        stopped
    }

    /// Writes app `app`'s record, replacing the one before. The record is serialized and
    /// written on the journal's own thread (queued in order with the app's other records):
    /// on the app's worker thread the pages serializing touches would stay resident in its
    /// stack for as long as the app runs (12 KB per app, measured with 200).
    pub fn save_record<T: Serialize + Send + 'static>(&self, app: &AppName, record: T) {
        let (records, app) = (self.records.clone(), app.clone());
        self.queue(Box::new(move || {
            let json = serde_json::to_vec(&record).map_err(io::Error::other);
            if let Err(e) = json.and_then(|j| write_record(&records, &app, &j)) {
                log::error!(
                    "journal: cannot write {}: {e}",
                    record_path(&records, &app).display()
                );
            }
        }));
    }

    /// Removes app `app`'s record (nothing of it runs any more).
    pub fn forget_record(&self, app: &AppName) {
        let path = record_path(&self.records, app);
        self.queue(Box::new(move || match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::error!("journal: cannot remove {}: {e}", path.display())
            }
            _ => {}
        }));
    }

    /// Returns once every record queued so far is written (before an in-place upgrade).
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.queue(Box::new(move || {
            let _ = tx.send(());
        }));
        let _ = rx.recv();
    }

    /// Runs `job` on the journal's thread, started at the first use (or here, if it cannot be).
    fn queue(&self, job: Job) {
        let writer = self.writer.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<Job>();
            std::thread::Builder::new()
                .name("journal".into())
                .spawn(move || rx.into_iter().for_each(|job| job()))
                .ok()
                .map(|_| tx)
        });
        match writer {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    (e.into_inner())();
                }
            }
            None => job(),
        }
    }

    /// Every app's record, or why it cannot be read.
    pub fn records<T: DeserializeOwned>(&self) -> Vec<(AppName, Result<T, RecordError>)> {
        let Ok(dir) = fs::read_dir(&self.records) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            let Ok(app) = AppName::new(name) else {
                continue; // a temp file, or not keter's
            };
            let read = fs::read(entry.path())
                .map_err(RecordError::Read)
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(RecordError::Json));
            out.push((app, read));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
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

fn record_path(records: &Path, app: &AppName) -> PathBuf {
    records.join(format!("{app}.json"))
}

/// Replaces a record (temp file, rename), readable by its owner alone: the processes'
/// environment is in it (the postgres plugin's password, say).
fn write_record(records: &Path, app: &AppName, json: &[u8]) -> io::Result<()> {
    fs::create_dir_all(records)?;
    let tmp = records.join(format!(".{app}.json.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(json)?;
    drop(file);
    fs::rename(&tmp, record_path(records, app))
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

        // A new journal (a restarted keter) stops the group it finds, unless it takes it over.
        let again = Journal::new(&dir);
        assert_eq!(
            again.recover(&BTreeSet::from([pid]), Duration::from_secs(2)),
            0
        );
        assert_eq!(
            parse(&fs::read_to_string(dir.join("processes")).unwrap())[0].0,
            pid
        );
        let again = Journal::new(&dir);
        assert_eq!(again.recover(&BTreeSet::new(), Duration::from_secs(2)), 1);
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

/// Why an app's record file does not read.
#[derive(Debug)]
pub enum RecordError {
    Read(io::Error),
    Json(serde_json::Error),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Read(e) => write!(f, "cannot read it: {e}"),
            RecordError::Json(e) => write!(f, "not JSON of a record: {e}"),
        }
    }
}

impl std::error::Error for RecordError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RecordError::Read(e) => Some(e),
            RecordError::Json(e) => Some(e),
        }
    }
}
