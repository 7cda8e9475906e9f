//! What the app workers and the Nginx controller report about themselves, for the status
//! interface (`keter status`, the web pages, `/api/apps`, `/metrics`). The daemon makes the
//! registry; the workers write it and the status server reads it.
//!
//! Each worker alone writes its app's entry (after every step it takes); readers get copies.
//! Counters that only grow (deploys by result, restarts, reloads) live here too, so that
//! metrics never go backwards when an app is removed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::formats::records::DeployResultRecord;

use crate::acme::{Acme, CertStatus};
use crate::applog::{AppLog, timestamp};
use crate::cgroup::Usage;
use crate::names::AppName;
use crate::requests::Requests;
use crate::requests::plot::Mark;

/// An app's state as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppState {
    /// A deploy is in progress and no version serves yet.
    Starting,
    /// A version serves and all its processes run.
    Running,
    /// A version serves and a new one is being deployed.
    Deploying,
    /// A process of the serving version failed several times in a row.
    CrashLooping,
    /// The last deploy failed and no version serves.
    Failed,
    /// The bundle was deleted: the app is out of Nginx and its processes are being stopped.
    Stopping,
    /// No version runs (the bundle was deleted).
    Stopped,
}

impl AppState {
    pub const ALL: [AppState; 7] = [
        AppState::Starting,
        AppState::Running,
        AppState::Deploying,
        AppState::CrashLooping,
        AppState::Failed,
        AppState::Stopping,
        AppState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Starting => "starting",
            AppState::Running => "running",
            AppState::Deploying => "deploying",
            AppState::CrashLooping => "crash-looping",
            AppState::Failed => "failed",
            AppState::Stopping => "stopping",
            AppState::Stopped => "stopped",
        }
    }
}

/// How a deploy ended.
/// Serialized in the status API (and read back from it by the tests); the records have their
/// own type, `formats::records::DeployResultRecord`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployResult {
    Succeeded,
    Failed,
    Superseded,
    Unchanged,
    /// A stop (the bundle deleted, keter stopping or being upgraded) interrupted it.
    Stopped,
}

impl DeployResult {
    pub const ALL: [DeployResult; 5] = [
        DeployResult::Succeeded,
        DeployResult::Failed,
        DeployResult::Superseded,
        DeployResult::Unchanged,
        DeployResult::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeployResult::Succeeded => "succeeded",
            DeployResult::Failed => "failed",
            DeployResult::Superseded => "superseded",
            DeployResult::Unchanged => "unchanged",
            DeployResult::Stopped => "stopped",
        }
    }
}

/// The record of a [`DeployResult`] (`src/formats/records.rs`).
impl From<DeployResult> for DeployResultRecord {
    fn from(r: DeployResult) -> DeployResultRecord {
        match r {
            DeployResult::Succeeded => DeployResultRecord::Succeeded,
            DeployResult::Failed => DeployResultRecord::Failed,
            DeployResult::Superseded => DeployResultRecord::Superseded,
            DeployResult::Unchanged => DeployResultRecord::Unchanged,
            DeployResult::Stopped => DeployResultRecord::Stopped,
        }
    }
}

impl From<DeployResultRecord> for DeployResult {
    fn from(r: DeployResultRecord) -> DeployResult {
        match r {
            DeployResultRecord::Succeeded => DeployResult::Succeeded,
            DeployResultRecord::Failed => DeployResult::Failed,
            DeployResultRecord::Superseded => DeployResult::Superseded,
            DeployResultRecord::Unchanged => DeployResult::Unchanged,
            DeployResultRecord::Stopped => DeployResult::Stopped,
        }
    }
}

/// The last deploy of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployReport {
    pub result: DeployResult,
    /// When it ended (UTC, RFC 3339).
    pub finished: String,
    pub duration_ms: u64,
    /// Why it failed; never contains secrets (keter's messages name files and keys only).
    pub error: Option<String>,
    /// What kind of failure: `bundle`, `unpack`, `config`, `host-taken`, `postgres`, `ports`,
    /// `spawn`, `not-ready` or `nginx`.
    pub error_kind: Option<&'static str>,
    /// When keter tries the same bundle again (UTC, RFC 3339): the failure may pass by
    /// itself. `None` for a failure that waits for a new bundle.
    pub retry_at: Option<String>,
}

/// One process of the serving version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessReport {
    /// `webapp` or `background`.
    pub kind: &'static str,
    /// Stanza index within its kind.
    pub stanza: usize,
    pub port: Option<u16>,
    /// `None` while it waits for a restart (or gave up).
    pub pid: Option<i32>,
    pub restarts: u64,
    /// A webapp's health while it serves (README "Supervision"): `unchecked`, `healthy`,
    /// `failing`, `unhealthy` or `replacing`; `None` for a background process.
    pub health: Option<&'static str>,
    /// How long its last health check took.
    pub health_latency_ms: Option<u64>,
    /// Failed health checks in a row.
    pub health_failures: u32,
    /// Why the last health check failed, while it fails.
    pub health_error: Option<String>,
    /// Times a fresh process took over from an unhealthy one in this place.
    pub health_replacements: u64,
    /// What its control group costs and is held to, read when the report is read (README
    /// "Limits and accounting").
    pub usage: Usage,
    /// Its control group (`src/cgroup.rs`), which `usage` is read from.
    #[serde(skip)]
    pub group: Option<String>,
}

/// Automatic rollback of an app (README "Releases and rollback", "Status interface").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoRollbackReport {
    /// The release watched, or rolled back.
    pub release: u64,
    /// `watching` (until `until`), `due` (a cause was found; the rollback waits for a deploy
    /// under way or an upgrade), `rolled-back` (to `to`, at `at`) or `failed` (its bundle
    /// could not be put in `incoming/`, or its deploy did not switch).
    pub state: &'static str,
    pub until: Option<String>,
    pub to: Option<u64>,
    /// Why it was (or is to be) rolled back.
    pub reason: Option<String>,
    pub at: Option<String>,
}

impl AutoRollbackReport {
    /// One line for people (the app page).
    pub fn describe(&self) -> String {
        let mut line = match (self.state, self.to) {
            ("watching", _) => format!(
                "release {} is watched until {}",
                self.release,
                self.until.as_deref().unwrap_or("?")
            ),
            ("due", _) => format!(
                "release {} is to be rolled back once nothing is under way",
                self.release
            ),
            (state, Some(to)) => format!("release {} {state} to release {to}", self.release),
            (state, None) => format!("release {} {state}", self.release),
        };
        if let Some(at) = &self.at {
            line.push_str(&format!(" at {at}"));
        }
        if let Some(why) = &self.reason {
            line.push_str(&format!(": {why}"));
        }
        line
    }
}

/// Everything known about one app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppReport {
    pub name: String,
    pub state: AppState,
    /// Hex SHA-256 of the serving bundle.
    pub sha256: Option<String>,
    /// Modification time of the serving bundle file (UTC, RFC 3339).
    pub bundle_time: Option<String>,
    /// Deploy number of the serving version within this run of keter.
    pub deploy: Option<u64>,
    pub hosts: Vec<String>,
    pub processes: Vec<ProcessReport>,
    /// When the serving version went live (UTC, RFC 3339) and for how long it has served.
    pub since: Option<String>,
    pub uptime_seconds: Option<u64>,
    /// Restarts of the serving version's processes.
    pub restarts: u64,
    pub last_deploy: Option<DeployReport>,
    /// The last error of any kind (failed deploy, crash).
    pub last_error: Option<String>,
    /// Output lines dropped because the log could not keep up.
    pub log_lines_dropped: u64,
    /// Old versions still draining.
    pub draining: usize,
    /// The app's releases, oldest first (README "Releases and rollback").
    pub releases: Vec<crate::app::releases::Release>,
    /// Bytes of the bundles kept for them under `ROOT/releases/NAME/`.
    pub releases_bytes: u64,
    /// In maintenance: since when, by whom, the operator's message; null otherwise.
    pub maintenance: Option<crate::app::maintenance::Maintenance>,
    /// Automatic rollback (README "Releases and rollback"): the release watched after its
    /// switch, or the last one keter rolled back by itself.
    pub auto_rollback: Option<AutoRollbackReport>,
    /// Where the deploy under way is: `unpacking`, `readiness` or `switching`.
    pub deploy_stage: Option<&'static str>,
    /// The serving version's site, rendered again (a certificate, a moved port, a replaced
    /// webapp, maintenance), waits for Nginx to take it.
    pub site_pending: bool,
    /// The sum of its processes' `usage` (limits are each process's own).
    pub usage: Usage,
    /// The certificates of the serving version's `ssl: acme` stanzas, as the ACME thread
    /// has them when the report is read (why there is none yet, the next attempt).
    pub certificates: Vec<CertStatus>,
    /// What Nginx served for the app (README, "Request metrics"); `None` before its first
    /// request since keter started.
    pub requests: Option<crate::requests::Summary>,
    /// When the serving version went live, so that readers compute `uptime_seconds` at the
    /// time they read (an idle worker does not publish again).
    #[serde(skip)]
    pub live_since: Option<SystemTime>,
    /// The names (file stems) of the host sets whose status goes into `certificates`.
    #[serde(skip)]
    pub certificate_names: Vec<String>,
}

impl AppReport {
    pub fn new(name: &AppName) -> AppReport {
        AppReport {
            name: name.to_string(),
            state: AppState::Starting,
            sha256: None,
            bundle_time: None,
            deploy: None,
            hosts: Vec::new(),
            processes: Vec::new(),
            since: None,
            uptime_seconds: None,
            restarts: 0,
            last_deploy: None,
            last_error: None,
            log_lines_dropped: 0,
            draining: 0,
            releases: Vec::new(),
            releases_bytes: 0,
            maintenance: None,
            auto_rollback: None,
            deploy_stage: None,
            site_pending: false,
            usage: Usage::default(),
            certificates: Vec::new(),
            requests: None,
            live_since: None,
            certificate_names: Vec::new(),
        }
    }

    /// The same report with `uptime_seconds`, the figures of the control groups, the
    /// certificates and the request metrics as of now.
    fn refreshed(mut self, certs: &[CertStatus], requests: &Requests) -> AppReport {
        self.requests = requests.summary(&self.name, crate::requests::unix_now());
        if let Some(t) = self.live_since {
            self.uptime_seconds = Some(t.elapsed().map(|d| d.as_secs()).unwrap_or(0));
        }
        if let Some(cgroups) = crate::cgroup::get() {
            let mut total = Usage::default();
            for p in &mut self.processes {
                if let Some(g) = &p.group {
                    p.usage = cgroups.usage(g);
                    total.add(&p.usage);
                }
            }
            self.usage = total;
        }
        self.certificates = self
            .certificate_names
            .iter()
            .filter_map(|n| certs.iter().find(|c| &c.name == n).cloned())
            .collect();
        self
    }
}

/// Upper bounds (seconds) of the duration histograms' buckets.
pub const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0,
];

/// A Prometheus-style histogram: counts per bucket, sum and count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (as in Prometheus), then the total count and the sum in
    /// seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let buckets = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// The registry every worker reports to.
#[derive(Debug, Default)]
pub struct Reports {
    apps: Mutex<BTreeMap<String, AppReport>>,
    deploys: [AtomicU64; DeployResult::ALL.len()],
    /// Rename-to-switch time of successful deploys.
    pub deploy_duration: Histogram,
    /// Start-to-ready time of webapp processes.
    pub readiness_wait: Histogram,
    /// Crash restarts, by app, since keter started.
    restarts: Mutex<BTreeMap<String, u64>>,
    /// Unhealthy webapps replaced, by app, since keter started.
    health_replacements: Mutex<BTreeMap<String, u64>>,
    /// Each app's log handle, for reading its recent lines (the worker owns the log; this is
    /// a second handle on the same in-memory tail).
    logs: Mutex<BTreeMap<String, AppLog>>,
    /// The ACME thread, whose certificate statuses go into the reports as they are read.
    acme: Certificates,
    /// What Nginx served, per app and release (the receiver thread adds to it).
    pub requests: Arc<Requests>,
    /// Each app's latest events (deploys, restarts), for the plots' time axis.
    events: Mutex<BTreeMap<String, VecDeque<Mark>>>,
}

/// Events kept per app.
pub const EVENTS_KEPT: usize = 64;

/// The ACME thread's handle, once the daemon started it.
#[derive(Default)]
struct Certificates(std::sync::OnceLock<Arc<Acme>>);

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Certificates(acme)"
        } else {
            "Certificates(none)"
        })
    }
}

impl Reports {
    /// Reads certificate statuses from `acme` from now on.
    pub fn attach_acme(&self, acme: Arc<Acme>) {
        let _ = self.acme.0.set(acme);
    }

    /// Every certificate the ACME thread works on.
    pub fn certificates(&self) -> Vec<CertStatus> {
        self.acme.0.get().map(|a| a.statuses()).unwrap_or_default()
    }

    /// Replaces an app's entry (by its worker).
    pub fn publish(&self, report: AppReport) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.insert(report.name.clone(), report);
    }

    pub fn deploy_finished(&self, result: DeployResult, took: Duration) {
        let i = DeployResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.deploys[i].fetch_add(1, Ordering::Relaxed);
        if result == DeployResult::Succeeded {
            self.deploy_duration.observe(took);
        }
    }

    pub fn restarted(&self, app: &AppName) {
        {
            let mut r = self.restarts.lock().unwrap_or_else(|e| e.into_inner());
            *r.entry(app.to_string()).or_default() += 1;
        }
        self.event(
            app,
            "restart",
            "a process was restarted after it ended".into(),
        );
    }

    /// Notes an event of `app` for the plots' time axis; the oldest go beyond
    /// [`EVENTS_KEPT`].
    pub fn event(&self, app: &AppName, kind: &'static str, detail: String) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let list = events.entry(app.to_string()).or_default();
        if list.len() >= EVENTS_KEPT {
            list.pop_front();
        }
        list.push_back(Mark {
            at: crate::requests::unix_now(),
            kind,
            detail,
        });
    }

    /// The events of `app`, oldest first.
    pub fn events(&self, app: &str) -> Vec<Mark> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .get(app)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn health_replaced(&self, app: &AppName) {
        let mut r = self
            .health_replacements
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *r.entry(app.to_string()).or_default() += 1;
        drop(r);
        self.event(
            app,
            "health replacement",
            "an unhealthy webapp was replaced by a fresh process".into(),
        );
    }

    /// Unhealthy webapps replaced, by app, since keter started.
    pub fn health_replacements(&self) -> BTreeMap<String, u64> {
        self.health_replacements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every app, by name.
    pub fn apps(&self) -> Vec<AppReport> {
        let certs = self.certificates();
        // Copied under the lock, refreshed (files of the kernel read) without it.
        let apps: Vec<AppReport> = {
            let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
            apps.values().cloned().collect()
        };
        apps.into_iter()
            .map(|r| r.refreshed(&certs, &self.requests))
            .collect()
    }

    pub fn app(&self, name: &str) -> Option<AppReport> {
        let certs = self.certificates();
        let app = {
            let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
            apps.get(name).cloned()
        };
        app.map(|r| r.refreshed(&certs, &self.requests))
    }

    /// Makes an app's recent output lines readable by the status interface.
    pub fn attach_log(&self, app: &AppName, log: AppLog) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.insert(app.to_string(), log);
    }

    /// The last `n` output lines of an app, oldest first; `None` for an unknown app.
    pub fn log_tail(&self, app: &str, n: usize) -> Option<Vec<String>> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.get(app).map(|log| log.tail(n))
    }

    /// Deploys counted by result.
    pub fn deploys(&self) -> Vec<(DeployResult, u64)> {
        DeployResult::ALL
            .iter()
            .zip(&self.deploys)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Crash restarts by app since keter started.
    pub fn restarts(&self) -> BTreeMap<String, u64> {
        self.restarts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// RFC 3339 UTC time of `t`.
pub fn rfc3339(t: SystemTime) -> String {
    timestamp(t)
}
