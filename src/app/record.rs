//! What an app's worker writes down so that a keter started later takes the app over as it is
//! (README, "A keter that dies and comes back"): its versions with their folders, bundle
//! configurations and processes (pid, start time, output pipe, restart state), its deploy
//! count, its last deploy and the failed deploy it will not retry at every event. The worker
//! writes its record (`ROOT/etc/state/NAME.json`, through [`crate::journal`]) whenever it
//! changes; an in-place upgrade and a keter started after a crash both begin from the records
//! (`adopt.rs`).
//!
//! The record types are in `src/formats/records.rs`; this file makes them from the worker's
//! state. Moments are carried on the system's monotonic clock ([`Mono`]).

use super::error::DeployError;
use super::machine::{Life, Machine};
use super::version::{ProcState, Version};
pub use crate::formats::Mono;
pub use crate::formats::records::{AppRecord, FORMAT, ProcRecordState, Standing, VersionRecord};
use crate::formats::records::{DeployRecord, FailedRecord, ProcRecord};
use crate::report::DeployReport;

/// The record of the last deploy.
fn deploy_record(r: &DeployReport) -> DeployRecord {
    DeployRecord {
        result: r.result.into(),
        finished: r.finished.clone(),
        duration_ms: r.duration_ms,
        error: r.error.clone(),
        error_kind: r.error_kind.map(str::to_string),
        retry_at: r.retry_at.clone(),
    }
}

impl DeployRecord {
    /// The last deploy again from its record.
    pub fn report(&self) -> DeployReport {
        DeployReport {
            result: self.result.into(),
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
                stamp: f.stamp.map(Into::into),
                retry_at: f.retry_at.map(Mono::of),
                backoff: f.backoff.into(),
            }),
            last_deploy: self.last_deploy.as_ref().map(deploy_record),
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
        stamp: v.stamp.into(),
        config: v.config_text.clone(),
        deploy: v.deploy,
        modified: v.modified,
        live_since: v.live_since,
        procs: v
            .procs
            .iter()
            .map(|p| ProcRecord {
                role: p.role.into(),
                spec: (&p.spec).into(),
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
                restarts: (&p.restarts).into(),
            })
            .collect(),
    }
}
