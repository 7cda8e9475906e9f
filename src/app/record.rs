//! What an app's worker writes down so that a keter started later takes the app over as it is
//! (README, "A keter that dies and comes back"): its versions with their folders, bundle
//! configurations and processes (pid, start time, output pipe, restart state), its deploy
//! count, its last deploy and the failed deploy it will not retry at every event. The worker
//! writes its record (`ROOT/etc/state/NAME.json`, through [`crate::journal`]) whenever it
//! changes; an in-place upgrade and a keter started after a crash both begin from the records
//! (`adopt.rs`).
//!
//! Moments are carried on the system's monotonic clock, which every process of one boot
//! shares: an `Instant` means nothing to another process.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::error::DeployError;
use super::machine::{Life, Machine};
use super::version::{FileStamp, ProcState, Role, Version};
use crate::process::Spec;
use crate::report::{DeployReport, DeployResult};
use crate::restart::{Backoff, Restarts};

/// The format of the records; a keter reads only its own.
pub const FORMAT: u32 = 1;

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
    pub stamp: FileStamp,
    /// The bundle's `config/keter.yaml` as it was deployed (read again from here, not from the
    /// folder, which the app's user may change).
    pub config: String,
    pub deploy: u64,
    pub modified: Option<SystemTime>,
    pub live_since: Option<SystemTime>,
    pub procs: Vec<ProcRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub role: Role,
    pub spec: Spec,
    pub state: ProcRecordState,
    pub restarts: Restarts,
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

/// The bundle whose deploy failed last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRecord {
    pub path: PathBuf,
    pub stamp: Option<FileStamp>,
    pub retry_at: Option<Mono>,
    pub backoff: Backoff,
}

/// [`DeployReport`] with owned strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub result: DeployResult,
    pub finished: String,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub error_kind: Option<String>,
    pub retry_at: Option<String>,
}

impl From<&DeployReport> for DeployRecord {
    fn from(r: &DeployReport) -> DeployRecord {
        DeployRecord {
            result: r.result,
            finished: r.finished.clone(),
            duration_ms: r.duration_ms,
            error: r.error.clone(),
            error_kind: r.error_kind.map(str::to_string),
            retry_at: r.retry_at.clone(),
        }
    }
}

impl DeployRecord {
    pub fn report(&self) -> DeployReport {
        DeployReport {
            result: self.result,
            finished: self.finished.clone(),
            duration_ms: self.duration_ms,
            error: self.error.clone(),
            error_kind: self
                .error_kind
                .as_deref()
                .and_then(|k| DeployError::KINDS.iter().copied().find(|known| *known == k)),
            retry_at: self.retry_at.clone(),
        }
    }
}

/// A moment on the monotonic clock (`CLOCK_MONOTONIC`, nanoseconds), the clock of `Instant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Mono(pub u64);

impl Mono {
    pub fn of(t: Instant) -> Mono {
        let (i0, m0) = anchor();
        match t.checked_duration_since(i0) {
            Some(after) => Mono(m0.saturating_add(after.as_nanos() as u64)),
            None => Mono(m0.saturating_sub((i0 - t).as_nanos() as u64)),
        }
    }

    pub fn instant(self) -> Instant {
        let (i0, m0) = anchor();
        if self.0 >= m0 {
            i0 + Duration::from_nanos(self.0 - m0)
        } else {
            i0.checked_sub(Duration::from_nanos(m0 - self.0))
                .unwrap_or(i0)
        }
    }
}

/// An `Instant` and the monotonic clock read together once, to convert between them.
fn anchor() -> (Instant, u64) {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        (Instant::now(), mono)
    })
}

impl Machine {
    /// The record of this app as it is now. A stage in flight is left out: an unpack or a
    /// readiness check is started again by the next keter from `incoming/`.
    pub fn to_record(&self) -> AppRecord {
        let mut versions = Vec::new();
        if let Some(v) = self.serving() {
            versions.push(version_record(v, Standing::Serving));
        }
        if let Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } = &self.life
            && let super::machine::Stage::Readiness(c) | super::machine::Stage::Switching(c) =
                &deploy.stage
        {
            versions.push(version_record(c, Standing::Candidate));
        }
        for r in &self.retiring {
            versions.push(version_record(&r.version, Standing::Retiring));
        }
        AppRecord {
            format: FORMAT,
            versions,
            deploys: self.deploys,
            failed: self.failed.as_ref().map(|f| FailedRecord {
                path: f.path.clone(),
                stamp: f.stamp,
                retry_at: f.retry_at.map(Mono::of),
                backoff: f.backoff,
            }),
            last_deploy: self.last_deploy.as_ref().map(DeployRecord::from),
            last_error: self.last_error.clone(),
        }
    }
}

fn version_record(v: &Version, standing: Standing) -> VersionRecord {
    VersionRecord {
        standing,
        id: v.id,
        dir: v.dir.clone(),
        sha256: v.sha256.clone(),
        stamp: v.stamp,
        config: v.config_text.clone(),
        deploy: v.deploy,
        modified: v.modified,
        live_since: v.live_since,
        procs: v
            .procs
            .iter()
            .map(|p| ProcRecord {
                role: p.role,
                spec: p.spec.clone(),
                state: match p.state {
                    ProcState::Running(r) => ProcRecordState::Running {
                        pid: r.pid,
                        ticks: r.ticks,
                        output: r.output,
                    },
                    ProcState::Backoff { until } => ProcRecordState::Backoff {
                        until: Mono::of(until),
                    },
                    ProcState::GaveUp => ProcRecordState::GaveUp,
                    ProcState::NotStarted | ProcState::Ended => ProcRecordState::Stopped,
                },
                restarts: p.restarts.clone(),
            })
            .collect(),
    }
}
