//! The app records, `ROOT/etc/state/NAME.json`: what an app's worker writes down so that a
//! keter started later takes the app over as it is (README, "A keter that dies and comes
//! back"). `src/app/record.rs` makes them from the worker's state, `src/app/adopt.rs` makes
//! the state again from them.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Mono, ReadError, Reads};

/// The format this build writes.
pub const FORMAT: u32 = 2;
/// The formats this build reads.
pub const READS: Reads = Reads {
    oldest: 1,
    newest: FORMAT,
};

/// Reads a record of any format in [`READS`], as the current format.
pub fn read(value: serde_json::Value) -> Result<AppRecord, ReadError> {
    let format = super::format_of(&value, READS)?;
    // Format 1 is format 2 without `stopped` among the deploy results: it reads as it is.
    let mut record: AppRecord = serde_json::from_value(value)?;
    debug_assert!(format <= FORMAT);
    record.format = FORMAT;
    Ok(record)
}

/// One app, as its worker last wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub format: u32,
    pub versions: Vec<VersionRecord>,
    /// Deploys that got as far as starting processes.
    pub deploys: u64,
    pub failed: Option<FailedRecord>,
    pub last_deploy: Option<DeployRecord>,
    pub last_error: Option<String>,
}

/// Where a version stood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// Nginx routes to it.
    Serving,
    /// Replaced, draining.
    Retiring,
    /// Being deployed: its processes run, Nginx may not route to it yet.
    Candidate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub standing: Standing,
    pub id: u64,
    pub dir: PathBuf,
    pub sha256: String,
    pub stamp: FileStampRecord,
    /// The bundle's `config/keter.yaml` as it was deployed (read again from here, not from the
    /// folder, which the app's user may change).
    pub config: String,
    pub deploy: u64,
    pub modified: Option<SystemTime>,
    pub live_since: Option<SystemTime>,
    pub procs: Vec<ProcRecord>,
}

/// The identity of a bundle file (`src/app/version.rs`, `FileStamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStampRecord {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub role: RoleRecord,
    pub spec: SpecRecord,
    pub state: ProcRecordState,
    pub restarts: RestartsRecord,
}

/// What a process is for (`src/app/version.rs`, `Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoleRecord {
    Web { index: usize, port: u16 },
    Background { index: usize },
}

/// How a process is started (`src/process.rs`, `Spec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub user: Option<RunAsRecord>,
}

/// The user a process runs as (`src/process.rs`, `RunAs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAsRecord {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcRecordState {
    /// Known by pid and start time; `output` is its pipe's inode.
    Running {
        pid: i32,
        ticks: u64,
        output: u64,
    },
    /// Starts again at `until`.
    Backoff {
        until: Mono,
    },
    GaveUp,
    /// Not running and not to be started again (not started yet, or ended).
    Stopped,
}

/// A process's restart state (`src/restart.rs`, `Restarts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartsRecord {
    pub policy: PolicyRecord,
    pub fixed_failures: u32,
    pub total: u64,
}

/// `src/restart.rs`, `Policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyRecord {
    Backoff(BackoffRecord),
    Fixed { delay: Duration, count: Option<u32> },
}

/// `src/restart.rs`, `Backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffRecord {
    pub first: Duration,
    pub max: Duration,
    pub healthy: Duration,
    pub next: Duration,
    pub failures: u32,
}

/// The bundle whose deploy failed last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRecord {
    pub path: PathBuf,
    pub stamp: Option<FileStampRecord>,
    pub retry_at: Option<Mono>,
    pub backoff: BackoffRecord,
}

/// The last deploy (`src/report.rs`, `DeployReport`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub result: DeployResultRecord,
    pub finished: String,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub error_kind: Option<String>,
    pub retry_at: Option<String>,
}

/// `src/report.rs`, `DeployResult`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployResultRecord {
    Succeeded,
    Failed,
    Superseded,
    Unchanged,
    /// Since format 2.
    Stopped,
}
