//! Unit tests of the worker's state machine with a fake spawner and a fake clock: every
//! transition is driven by events and `tick`, and what the machine does to the world is
//! recorded. The integration tests (`tests/integration/`) drive the real binary.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::deploy::{Check, PrepareJob, Prepared, SwitchJob};
use super::error::DeployError;
use super::health::{CheckFailure, HealthCheck, Outcome};
use super::machine::{Event, Handover, Life, Machine, PORT_WATCH, Stage};
use super::version::{FileStamp, Proc, ProcState, Role, Version};
use super::{Command, Effects};
use crate::names::{AppName, Hostname};
use crate::nginx::NginxError;
use crate::ports::{Holder, Look, PortUse};
use crate::postgres::PgError;
use crate::process::{Running, Spec};
use crate::report::{AppState, DeployResult};
use crate::restart::Policy;

/// The world as the machine sees it, with a clock that moves only when told.
struct Fake {
    now: Instant,
    next_id: u64,
    pid: i32,
    stamps: HashMap<PathBuf, FileStamp>,
    /// Spawns that fail from now on (`ENOENT`), counted down.
    failing_spawns: usize,
    spawned: Vec<(u64, usize, i32)>,
    prepares: Vec<PrepareJob>,
    releases: Option<super::releases::Releases>,
    readiness: Vec<(u64, Vec<Check>)>,
    switches: Vec<SwitchJob>,
    cancelled: Vec<u64>,
    discarded: Vec<u64>,
    removed_site: usize,
    drained: bool,
    restarted: usize,
    finished: Vec<DeployResult>,
    stopped: Vec<u64>,
    /// Versions whose site was rendered again (a new certificate).
    refreshed: Vec<u64>,
    /// Of those, the ones rendered only to be taken if they differ (`rewrite_due`).
    rewritten: usize,
    /// Refreshes that fail from now on, counted down.
    failing_refreshes: usize,
    /// Groups stopped after their leader exited, or because it lost its port.
    reaped: Vec<i32>,
    /// The `PORT` each spawn was given.
    spawned_port: Vec<Option<String>>,
    /// The webapps' ports of each site rendered again.
    refreshed_ports: Vec<Vec<(usize, u16)>>,
    /// Whether Nginx took each of `refreshed_ports`.
    refresh_taken: Vec<bool>,
    /// Ports someone else holds, and by whom.
    held: HashMap<u16, Holder>,
    /// Process groups (by leader) that listen on their own port.
    listening: Vec<i32>,
    /// Ports the pool handed out, and took back.
    acquired: Vec<u16>,
    released: Vec<u16>,
    /// The pool has no free port.
    pool_empty: bool,
    /// Every look at who uses a port.
    port_checks: std::cell::RefCell<Vec<(u16, Look)>>,
    /// What the stages the machine started send back once done (`Discarded`, `Reaped`),
    /// delivered by [`settle`].
    completions: Vec<Event>,
    /// The report and record last published.
    published: Option<(crate::report::AppReport, super::record::AppRecord)>,
    /// Freezes and snapshots answered.
    answers: usize,
    /// The wall clock, as far from `now` as it was at the start unless jumped.
    wall: std::time::SystemTime,
    /// The hosts the app kept at its last release of the others.
    hosts_used: Option<std::collections::BTreeSet<String>>,
    /// The global health checks.
    health: crate::config::HealthChecks,
    /// Health checks started, and when.
    checks: Vec<HealthCheck>,
    checks_started: Vec<Instant>,
    /// Processes handed to a stage that stops them (replaced, or fresh and not ready).
    stopped_pids: Vec<i32>,
    /// Unhealthy webapps replaced.
    replaced: usize,
    /// The global keys of automatic rollback.
    rollback: crate::config::AutoRollback,
    /// What the request metrics say of the serving release's errors.
    errors: Option<crate::requests::ErrorsBeside>,
    /// Kept bundles put into `incoming/`, by sha256.
    placed: Vec<String>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            now: Instant::now(),
            next_id: 1,
            pid: 1000,
            stamps: HashMap::new(),
            failing_spawns: 0,
            spawned: Vec::new(),
            prepares: Vec::new(),
            releases: None,
            readiness: Vec::new(),
            switches: Vec::new(),
            cancelled: Vec::new(),
            discarded: Vec::new(),
            removed_site: 0,
            drained: false,
            restarted: 0,
            finished: Vec::new(),
            stopped: Vec::new(),
            refreshed: Vec::new(),
            rewritten: 0,
            failing_refreshes: 0,
            reaped: Vec::new(),
            spawned_port: Vec::new(),
            refreshed_ports: Vec::new(),
            refresh_taken: Vec::new(),
            held: HashMap::new(),
            listening: Vec::new(),
            acquired: Vec::new(),
            released: Vec::new(),
            pool_empty: false,
            port_checks: std::cell::RefCell::new(Vec::new()),
            completions: Vec::new(),
            published: None,
            answers: 0,
            wall: std::time::SystemTime::now(),
            hosts_used: None,
            // Off unless a test turns them on (`tests/health.rs`): the other tests count the
            // machine's deadlines.
            health: crate::config::HealthChecks {
                interval: Duration::ZERO,
                ..crate::config::HealthChecks::default()
            },
            checks: Vec::new(),
            checks_started: Vec::new(),
            stopped_pids: Vec::new(),
            replaced: 0,
            rollback: crate::config::AutoRollback::default(),
            errors: None,
            placed: Vec::new(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.wall += d;
    }

    /// Puts bundle file number `n` at `incoming/app.keter`.
    fn bundle(&mut self, n: u64) -> PathBuf {
        let path = PathBuf::from("/root/incoming/app.keter");
        self.stamps.insert(path.clone(), FileStamp::fake(n));
        path
    }
}

impl Effects for Fake {
    fn now(&self) -> Instant {
        self.now
    }
    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        self.stamps.get(path).copied()
    }
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }
    fn readiness_timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
    fn drain_time(&self) -> Duration {
        Duration::from_secs(20)
    }
    fn prepare(&mut self, job: PrepareJob) {
        self.prepares.push(job);
    }
    fn readiness(&mut self, version: u64, checks: Vec<Check>) {
        self.readiness.push((version, checks));
    }
    fn switch(&mut self, job: SwitchJob) {
        self.switches.push(job);
    }
    fn cancel(&mut self, version: u64) -> String {
        self.cancelled.push(version);
        "never listened on port 4000".into()
    }
    fn spawn(&mut self, version: u64, proc: usize, spec: &Spec, _: &str) -> io::Result<Running> {
        if self.failing_spawns > 0 {
            self.failing_spawns -= 1;
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        self.pid += 1;
        self.spawned.push((version, proc, self.pid));
        self.spawned_port.push(
            spec.env
                .iter()
                .find(|(k, _)| k == "PORT")
                .map(|(_, v)| v.clone()),
        );
        Ok(Running {
            pid: self.pid,
            started: self.now,
            ticks: self.pid as u64,
            output: 0,
        })
    }
    fn reap(&mut self, pid: i32) {
        self.reaped.push(pid);
        self.completions.push(Event::Reaped { pid });
    }
    fn port_use(&self, port: u16, own: Option<i32>, look: Look) -> PortUse {
        self.port_checks.borrow_mut().push((port, look));
        match self.held.get(&port) {
            Some(h) => PortUse::Other(h.clone()),
            None if own.is_some_and(|pid| self.listening.contains(&pid)) => PortUse::Own,
            None => PortUse::Free,
        }
    }
    fn acquire_port(&mut self) -> Option<u16> {
        if self.pool_empty {
            return None;
        }
        // As the real pool: round robin from 5000, skipping a port that someone holds.
        let after = self.acquired.last().map_or(5000, |p| p + 1);
        let port = (after..).find(|p| !self.held.contains_key(p)).unwrap();
        self.acquired.push(port);
        Some(port)
    }
    fn release_port(&mut self, port: u16) {
        self.released.push(port);
    }
    fn discard(&mut self, version: Box<Version>) {
        self.discarded.push(version.id);
        self.completions.push(Event::Discarded {
            version: version.id,
        });
    }
    fn leave_nginx(&mut self) {
        self.removed_site += 1;
        self.completions.push(Event::SiteRemoved { result: Ok(9) });
    }
    fn drained(&self, _: &Version, _: Duration) -> bool {
        self.drained
    }
    fn release_hosts(&mut self, used: &[&Hostname]) {
        self.hosts_used = Some(used.iter().map(|h| h.to_string()).collect());
    }
    fn refresh_site(&mut self, version: u64, job: Option<SwitchJob>, unless_same: bool) {
        let Some(job) = job else {
            self.removed_site += 1;
            self.completions.push(Event::Refreshed {
                version,
                result: Ok(9),
            });
            return;
        };
        self.refreshed.push(job.version);
        self.rewritten += usize::from(unless_same);
        self.refreshed_ports.push(job.ports.clone());
        self.refresh_taken.push(self.failing_refreshes == 0);
        let result = if self.failing_refreshes > 0 {
            self.failing_refreshes -= 1;
            Err(DeployError::Nginx(NginxError::Unconfirmed(
                crate::nginx::Unconfirmed::Stopped,
            )))
        } else {
            Ok(10)
        };
        self.completions.push(Event::Refreshed { version, result });
    }
    fn release_certificates(&mut self, _: &[crate::acme::HostSet]) {}
    fn restarted(&mut self) {
        self.restarted += 1;
    }
    fn deploy_finished(&mut self, result: DeployResult, _: Duration) {
        self.finished.push(result);
    }
    fn note(&mut self, _: &str) {}
    fn last_output(&self) -> String {
        "; the app printed nothing".into()
    }
    fn stopped(&mut self, commands: u64) {
        self.stopped.push(commands);
    }
    fn wall_clock(&self) -> std::time::SystemTime {
        self.wall
    }
    fn publish(&mut self, report: crate::report::AppReport, record: super::record::AppRecord) {
        self.published = Some((report, record));
    }
    fn log_lines_dropped(&self) -> u64 {
        0
    }
    fn place_release(&mut self, sha256: &str, _owner: u32, path: &Path) -> io::Result<()> {
        let n = sha256
            .strip_prefix("sha-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(99);
        self.bundle(n);
        self.placed.push(sha256.to_string());
        let _ = path;
        Ok(())
    }
    fn save_maintenance(&mut self, _m: Option<&super::maintenance::Maintenance>) {}
    fn keep_releases(&self) -> usize {
        3
    }
    fn write_releases(&mut self, releases: &super::releases::Releases) {
        self.releases = Some(releases.clone());
    }
    fn answer(&mut self, reply: crossbeam_channel::Sender<()>) {
        self.answers += 1;
        let _ = reply.send(());
    }
    fn health_defaults(&self) -> crate::config::HealthChecks {
        self.health
    }
    fn health_check(&mut self, check: HealthCheck) {
        self.checks.push(check);
        self.checks_started.push(self.now);
    }
    fn stop_process(&mut self, pid: i32) {
        self.stopped_pids.push(pid);
        self.completions.push(Event::Reaped { pid });
    }
    fn health_replaced(&mut self) {
        self.replaced += 1;
    }
    fn rollback_defaults(&self) -> crate::config::AutoRollback {
        self.rollback
    }
    fn errors_since_switch(
        &self,
        _deploy: u64,
        _switched: std::time::SystemTime,
    ) -> Option<crate::requests::ErrorsBeside> {
        self.errors
    }
}

/// Delivers what the stages started so far sent back (versions stopped, groups reaped), as
/// the worker's loop would.
fn settle(m: &mut Machine, fx: &mut Fake) {
    while !fx.completions.is_empty() {
        let done = std::mem::take(&mut fx.completions);
        for e in done {
            m.on(e, fx);
        }
    }
}

const WEB: &str = "exec: ../dist/app\nhost: app.example.com\n";
const WEB_AND_WORKER: &str = "stanzas:\n  - type: webapp\n    exec: ../dist/app\n    hosts: [app.example.com]\n  - type: background\n    exec: ../dist/worker\n    restart-count: 2\n    restart-delay-seconds: 1\n";

/// A prepared version `id` of `yaml`, from bundle file `n`, its processes not started.
fn version(id: u64, n: u64, yaml: &str) -> Version {
    let tree = crate::yaml::parse(yaml).unwrap();
    let mut problems = crate::problem::Problems::new("app.keter: config/keter.yaml");
    let config = crate::bundle::config::from_tree(&tree, &mut problems).unwrap();
    let spec = Spec {
        program: "/root/temp/app/dist/app".into(),
        args: Vec::new(),
        cwd: "/root/temp/app".into(),
        env: Vec::new(),
        user: None,
        limits: Default::default(),
    };
    let mut procs = Vec::new();
    for (index, b) in config.background.iter().enumerate() {
        let policy = Policy::Fixed {
            delay: b.restart_delay,
            count: b.restart_count,
        };
        procs.push(Proc::new(Role::Background { index }, spec.clone(), policy));
    }
    for index in 0..config.webapps.len() {
        let port = 4000 + id as u16;
        let role = Role::Web { index, port };
        let mut spec = spec.clone();
        spec.env = vec![
            ("PORT".into(), port.to_string()),
            ("YESOD_PORT".into(), port.to_string()),
            ("SECRET".into(), port.to_string()),
        ];
        procs.push(Proc::new(role, spec, Policy::WEBAPP));
    }
    Version {
        id,
        dir: format!("/root/temp/app-{id}").into(),
        sha256: format!("{id:064}"),
        stamp: FileStamp::fake(n),
        config,
        config_text: yaml.to_string(),
        plugin_env: BTreeMap::new(),
        user: None,
        procs,
        deploy: 0,
        modified: None,
        live_since: None,
        arrival: None,
    }
}

fn exit_code(code: i32) -> Option<ExitStatus> {
    Some(ExitStatus::from_raw(code << 8))
}

fn machine() -> Machine {
    Machine::new(AppName::new("app").unwrap())
}

fn deploy(m: &mut Machine, fx: &mut Fake, n: u64) {
    let path = fx.bundle(n);
    m.on(Event::Command(Command::Deploy { path, retry: false }), fx);
}

/// Takes bundle file `n` through every stage to serving; returns its version id.
fn serve(m: &mut Machine, fx: &mut Fake, n: u64, yaml: &str) -> u64 {
    deploy(m, fx, n);
    let id = fx.prepares.last().unwrap().id;
    switch_in(m, fx, version(id, n, yaml))
}

/// The deploy under way unpacked into `v`, ready and switched; returns its version id.
fn switch_in(m: &mut Machine, fx: &mut Fake, v: Version) -> u64 {
    let id = v.id;
    m.on(
        Event::Prepared {
            id,
            result: Ok(Prepared::Version(Box::new(v))),
        },
        fx,
    );
    m.on(
        Event::Ready {
            version: id,
            result: Ok(()),
        },
        fx,
    );
    m.on(
        Event::Switched {
            version: id,
            result: Ok(()),
        },
        fx,
    );
    assert!(matches!(m.life, Life::Serving(ref v) if v.id == id));
    id
}

/// Takes bundle file `n` up to its readiness stage; returns its version id.
fn to_readiness(m: &mut Machine, fx: &mut Fake, n: u64) -> u64 {
    deploy(m, fx, n);
    let id = fx.prepares.last().unwrap().id;
    m.on(
        Event::Prepared {
            id,
            result: Ok(Prepared::Version(Box::new(version(id, n, WEB)))),
        },
        fx,
    );
    id
}

/// The pid of process `proc` of version `id` as last spawned.
fn pid_of(fx: &Fake, id: u64, proc: usize) -> i32 {
    fx.spawned
        .iter()
        .rev()
        .find(|(v, p, _)| *v == id && *p == proc)
        .unwrap()
        .2
}

/// When process `i` of the serving version is due to restart.
fn restart_at(m: &Machine, i: usize) -> Instant {
    match serving_proc(m, i) {
        ProcState::Backoff { until } => until,
        other => panic!("process {i} is not waiting for a restart: {other:?}"),
    }
}

fn serving_proc(m: &Machine, i: usize) -> ProcState {
    match &m.life {
        Life::Serving(v) => v.procs[i].state,
        Life::Deploying {
            serving: Some(v), ..
        } => v.procs[i].state,
        _ => panic!("nothing serves"),
    }
}

#[test]
fn the_serving_version_is_restarted_while_a_slow_deploy_waits_for_readiness() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    assert!(
        matches!(&m.life, Life::Deploying { deploy, .. } if matches!(deploy.stage, Stage::Readiness(_)))
    );
    // v1's webapp is killed while v2 is still not listening.
    let pid = pid_of(&fx, v1, 0);
    m.on(
        Event::Exited {
            version: v1,
            proc: 0,
            pid,
            status: Some(ExitStatus::from_raw(9)),
        },
        &mut fx,
    );
    let due = fx.now + Duration::from_millis(100);
    assert_eq!(serving_proc(&m, 0), ProcState::Backoff { until: due });
    // Its port is free for anyone meanwhile: looked at once, then every PORT_WATCH.
    assert_eq!(m.next_deadline(fx.now), Some(fx.now));
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now), Some(fx.now + PORT_WATCH));
    fx.advance(Duration::from_millis(100));
    m.tick(&mut fx);
    let restarted = pid_of(&fx, v1, 0);
    assert_ne!(restarted, pid);
    assert!(matches!(serving_proc(&m, 0), ProcState::Running(r) if r.pid == restarted));
    assert_eq!(fx.restarted, 1);
    assert_eq!(m.report(0, fx.wall).state, AppState::Deploying);
    assert!(
        fx.switches.iter().all(|s| s.version != v2),
        "v2 switched without being ready"
    );
}

#[test]
fn the_serving_version_is_restarted_and_stopped_while_nginx_has_not_answered_a_refresh() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB);
    // A new certificate: the site goes to Nginx, which takes its time to answer (its
    // reload-timeout, when its master is stuck).
    m.step(
        vec![Event::Certificate {
            hosts: "app.example.com".into(),
        }],
        &mut fx,
    );
    assert_eq!(fx.refreshed, [v]);
    assert!(m.refreshing.is_some());
    // Meanwhile the webapp is killed: it is restarted after its restart delay, not after
    // Nginx's answer.
    let pid = pid_of(&fx, v, 0);
    m.step(
        vec![Event::Exited {
            version: v,
            proc: 0,
            pid,
            status: Some(ExitStatus::from_raw(9)),
        }],
        &mut fx,
    );
    fx.advance(Duration::from_millis(100));
    m.step(vec![Event::Tick], &mut fx);
    let restarted = pid_of(&fx, v, 0);
    assert_ne!(restarted, pid);
    assert!(matches!(serving_proc(&m, 0), ProcState::Running(r) if r.pid == restarted));
    assert!(m.refreshing.is_some(), "Nginx has not answered yet");
    // A stop meanwhile: the site's removal is handed to Nginx after the refresh (so it wins),
    // and the refresh's late answer changes nothing.
    m.step(vec![Event::Command(Command::Stop)], &mut fx);
    assert_eq!(fx.removed_site, 1);
    assert!(matches!(m.life, Life::Leaving { .. }));
    settle(&mut m, &mut fx);
    assert!(matches!(m.life, Life::Idle(_)));
    assert!(m.refreshing.is_none() && m.quiet());
    assert_eq!(fx.discarded, [v]);
    assert_eq!(fx.refreshed, [v], "rendered again after the stop");
}

#[test]
fn a_restart_that_cannot_start_the_process_follows_the_restart_policy() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v = serve(&mut m, &mut fx, 1, WEB_AND_WORKER);
    // The background stanza (restart-count 2, 1 s): it exits, and its executable is gone.
    let pid = pid_of(&fx, v, 0);
    m.on(
        Event::Exited {
            version: v,
            proc: 0,
            pid,
            status: exit_code(1),
        },
        &mut fx,
    );
    fx.failing_spawns = 100;
    let mut tries = 0;
    for _ in 0..10 {
        let Some(at) = m.next_deadline(fx.now) else {
            break;
        };
        assert_eq!(at - fx.now, Duration::from_secs(1));
        fx.advance(Duration::from_secs(1));
        let before = fx.failing_spawns;
        m.tick(&mut fx);
        tries += before - fx.failing_spawns;
    }
    // The exit used one of the two restarts, the first failed spawn the other; the second
    // failed spawn gives up.
    assert_eq!(tries, 2);
    assert_eq!(serving_proc(&m, 0), ProcState::GaveUp);
    assert_eq!(m.next_deadline(fx.now), None);
    assert_eq!(
        fx.restarted, 0,
        "a restart that started nothing was counted"
    );
    assert_eq!(m.report(0, fx.wall).restarts, 0);

    // The webapp's failed spawns back off as its exits do: 0.1 s, 0.2 s, 0.4 s.
    let pid = pid_of(&fx, v, 1);
    m.on(
        Event::Exited {
            version: v,
            proc: 1,
            pid,
            status: exit_code(1),
        },
        &mut fx,
    );
    // (The webapp's port is looked at meanwhile, every PORT_WATCH: the restart is read from
    // its state.)
    let mut delays = Vec::new();
    for _ in 0..3 {
        let at = restart_at(&m, 1);
        delays.push((at - fx.now).as_millis());
        fx.now = at;
        m.tick(&mut fx);
    }
    assert_eq!(delays, [100, 200, 400]);
    fx.failing_spawns = 0;
    let at = restart_at(&m, 1);
    assert_eq!((at - fx.now).as_millis(), 800);
    fx.now = at;
    m.tick(&mut fx);
    assert!(matches!(serving_proc(&m, 1), ProcState::Running(_)));
    assert_eq!(fx.restarted, 1);
}

#[test]
fn an_app_whose_last_deploy_failed_is_stopped_when_its_bundle_is_deleted() {
    let (mut m, mut fx) = (machine(), Fake::new());
    deploy(&mut m, &mut fx, 1);
    let id = fx.prepares[0].id;
    m.on(
        Event::Prepared {
            id,
            result: Err(DeployError::Bundle(crate::bundle::UnpackError::Refused(
                "broken".into(),
            ))),
        },
        &mut fx,
    );
    assert_eq!(m.report(0, fx.wall).state, AppState::Failed);
    m.on(Event::Command(Command::Stop), &mut fx);
    assert_eq!(m.report(0, fx.wall).state, AppState::Stopped);
    // The daemon learns that the stop answers both commands, and may end the worker.
    assert_eq!(fx.stopped, [2]);
    m.on(Event::Shutdown, &mut fx);
    assert!(m.ended());
}

#[test]
fn a_failure_that_may_pass_is_retried_with_backoff_and_one_that_cannot_waits() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    deploy(&mut m, &mut fx, 2);
    let pg_down = || {
        Err(DeployError::Postgres(PgError::Connect {
            server: "127.0.0.1:5432".into(),
            message: "connection refused".into(),
        }))
    };
    let mut delays = Vec::new();
    for _ in 0..3 {
        let id = fx.prepares.last().unwrap().id;
        m.on(
            Event::Prepared {
                id,
                result: pg_down(),
            },
            &mut fx,
        );
        let report = m.report(0, fx.wall);
        assert_eq!(report.state, AppState::Running);
        let last = report.last_deploy.unwrap();
        assert_eq!(last.error_kind, Some("postgres"));
        assert!(last.retry_at.is_some());
        let at = m.next_deadline(fx.now).unwrap();
        delays.push((at - fx.now).as_secs());
        // A repeated event for the same file does not retry before the time.
        let tried = fx.prepares.len();
        deploy(&mut m, &mut fx, 2);
        assert_eq!(fx.prepares.len(), tried);
        fx.now = at;
        m.tick(&mut fx);
        assert_eq!(fx.prepares.len(), tried + 1, "not tried again");
        let path = fx.bundle(2);
        assert_eq!(fx.prepares.last().unwrap().path, path);
    }
    assert_eq!(delays, [5, 10, 20]);
    // The server is back: the retry deploys, and no retry is left.
    let id = fx.prepares.last().unwrap().id;
    m.on(
        Event::Prepared {
            id,
            result: Ok(Prepared::Version(Box::new(version(id, 2, WEB)))),
        },
        &mut fx,
    );
    m.on(
        Event::Ready {
            version: id,
            result: Ok(()),
        },
        &mut fx,
    );
    m.on(
        Event::Switched {
            version: id,
            result: Ok(()),
        },
        &mut fx,
    );
    assert!(matches!(&m.life, Life::Serving(v) if v.id == id));
    assert!(m.retiring.iter().any(|r| r.version.id == v1));
    assert!(m.failed.is_none());

    // A bad configuration waits for a new bundle.
    deploy(&mut m, &mut fx, 3);
    let id = fx.prepares.last().unwrap().id;
    m.on(
        Event::Prepared {
            id,
            result: Err(DeployError::Config(crate::problem::Invalid(Vec::new()))),
        },
        &mut fx,
    );
    let last = m.report(0, fx.wall).last_deploy.unwrap();
    assert_eq!((last.error_kind, last.retry_at), (Some("config"), None));
    fx.drained = true;
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now), None);
    let tried = fx.prepares.len();
    deploy(&mut m, &mut fx, 3);
    assert_eq!(
        fx.prepares.len(),
        tried,
        "an unchanged bad bundle was tried again"
    );
    deploy(&mut m, &mut fx, 4);
    assert_eq!(fx.prepares.len(), tried + 1);
}

#[test]
fn a_newer_bundle_supersedes_a_deploy_waiting_for_readiness() {
    let (mut m, mut fx) = (machine(), Fake::new());
    deploy(&mut m, &mut fx, 1);
    let v1 = fx.prepares[0].id;
    m.on(
        Event::Prepared {
            id: v1,
            result: Ok(Prepared::Version(Box::new(version(v1, 1, WEB)))),
        },
        &mut fx,
    );
    assert_eq!(m.report(0, fx.wall).state, AppState::Starting);
    // The same file again is no newer command.
    deploy(&mut m, &mut fx, 1);
    assert!(fx.cancelled.is_empty());
    deploy(&mut m, &mut fx, 2);
    assert_eq!(fx.cancelled, [v1]);
    assert_eq!(fx.discarded, [v1]);
    assert_eq!(fx.finished, [DeployResult::Superseded]);
    assert_eq!(fx.prepares.len(), 2);
    // The late answer of the superseded checks changes nothing.
    m.on(
        Event::Ready {
            version: v1,
            result: Ok(()),
        },
        &mut fx,
    );
    assert!(fx.switches.is_empty());
}

#[test]
fn commands_during_an_unpack_wait_for_it_and_only_the_newest_is_kept() {
    let (mut m, mut fx) = (machine(), Fake::new());
    deploy(&mut m, &mut fx, 1);
    deploy(&mut m, &mut fx, 2);
    deploy(&mut m, &mut fx, 3);
    assert_eq!(fx.prepares.len(), 1, "an unpack is never run twice at once");
    let first = fx.prepares[0].id;
    m.on(
        Event::Prepared {
            id: first,
            result: Ok(Prepared::Version(Box::new(version(first, 1, WEB)))),
        },
        &mut fx,
    );
    assert_eq!(fx.discarded, [first]);
    assert!(fx.spawned.is_empty(), "a superseded version was started");
    assert_eq!(fx.prepares.len(), 2);
    assert_eq!(fx.stamp(&fx.prepares[1].path), Some(FileStamp::fake(3)));
}

#[test]
fn a_shutdown_during_the_switch_waits_for_it_then_stops_everything() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    m.on(
        Event::Ready {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    assert_eq!(fx.switches.len(), 2);
    m.on(Event::Shutdown, &mut fx);
    assert!(matches!(m.life, Life::Stopping { exit: true, .. }));
    assert_eq!(
        fx.removed_site, 0,
        "the site was removed under a switch in flight"
    );
    m.on(
        Event::Switched {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    assert!(!m.ended(), "the versions' stops must be waited for");
    settle(&mut m, &mut fx);
    assert!(m.ended());
    assert_eq!(fx.removed_site, 1);
    let mut discarded = fx.discarded.clone();
    discarded.sort();
    assert_eq!(discarded, [v1, v2]);
}

#[test]
fn a_webapp_that_exits_before_it_is_ready_fails_the_deploy_for_good() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    let pid = pid_of(&fx, v2, 0);
    m.on(
        Event::Exited {
            version: v2,
            proc: 0,
            pid,
            status: exit_code(3),
        },
        &mut fx,
    );
    // Cancelling is idempotent: once for what the checks last saw, once with the candidate.
    fx.cancelled.dedup();
    assert_eq!(fx.cancelled, [v2]);
    assert_eq!(fx.discarded, [v2]);
    assert!(matches!(&m.life, Life::Serving(v) if v.id == v1));
    let last = m.report(0, fx.wall).last_deploy.unwrap();
    assert_eq!(last.error_kind, Some("not-ready"));
    assert_eq!(last.retry_at, None);
    assert!(
        last.error
            .unwrap()
            .contains("exited with exit code 3 before answering"),
        "{:?}",
        m.last_error
    );
}

#[test]
fn the_old_version_is_stopped_once_drained_and_a_failed_switch_keeps_it() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    m.on(
        Event::Ready {
            version: v2,
            result: Ok(()),
        },
        &mut fx,
    );
    m.on(
        Event::Switched {
            version: v2,
            result: Err(DeployError::Nginx(NginxError::Rejected("bad".into()))),
        },
        &mut fx,
    );
    assert!(matches!(&m.life, Life::Serving(v) if v.id == v1));
    assert_eq!(fx.discarded, [v2]);
    let v3 = serve(&mut m, &mut fx, 3, WEB);
    assert_eq!(m.report(0, fx.wall).draining, 1);
    assert!(m.next_deadline(fx.now).is_some(), "draining needs checks");
    m.tick(&mut fx);
    assert_eq!(m.retiring.len(), 1, "stopped before it drained");
    fx.drained = true;
    m.tick(&mut fx);
    assert!(m.retiring.is_empty());
    assert_eq!(fx.discarded, [v2, v1]);
    assert_eq!(m.report(0, fx.wall).deploy, Some(3));
    let _ = v3;
}

mod autorollback;
mod health;
mod ports;
mod random;
mod takeover;

#[test]
fn a_new_certificate_renders_the_serving_site_again_without_restarting_the_app() {
    let mut fx = Fake::new();
    let mut m = machine();
    let id = serve(&mut m, &mut fx, 1, WEB);
    let spawned = fx.spawned.len();
    let certificate = || Event::Certificate {
        hosts: "app.example.com".into(),
    };
    m.on(certificate(), &mut fx);
    assert_eq!(m.next_deadline(fx.now), Some(fx.now), "due at once");
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id]);
    assert!(!m.refresh_due);
    assert_eq!(fx.spawned.len(), spawned, "no process was started");
    assert!(matches!(m.life, Life::Serving(ref v) if v.id == id));
    // One at a time: a certificate while Nginx has not answered waits for the answer (no
    // deadline meanwhile), then renders again.
    m.on(certificate(), &mut fx);
    assert_eq!(m.next_deadline(fx.now), None);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id]);
    assert!(!m.quiet(), "a freeze waits for Nginx's answer");
    settle(&mut m, &mut fx);
    assert_eq!(m.next_deadline(fx.now), Some(fx.now));
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id, id]);
    settle(&mut m, &mut fx);
    assert!(m.quiet() && m.refreshing.is_none());
    fx.refreshed.pop();

    // During a deploy it waits until a version serves again (the candidate's switch renders
    // with what the certificates are by then, and once more after).
    deploy(&mut m, &mut fx, 2);
    m.on(certificate(), &mut fx);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id]);
    let next = fx.prepares.last().unwrap().id;
    m.on(
        Event::Prepared {
            id: next,
            result: Ok(Prepared::Version(Box::new(version(next, 2, WEB)))),
        },
        &mut fx,
    );
    m.on(
        Event::Ready {
            version: next,
            result: Ok(()),
        },
        &mut fx,
    );
    m.on(
        Event::Switched {
            version: next,
            result: Ok(()),
        },
        &mut fx,
    );
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id, next]);
    settle(&mut m, &mut fx);

    // Frozen for an upgrade: nothing changes Nginx until the thaw.
    m.frozen = true;
    m.on(certificate(), &mut fx);
    m.tick(&mut fx);
    assert_eq!(m.next_deadline(fx.now).filter(|t| *t == fx.now), None);
    assert_eq!(fx.refreshed, [id, next]);
    m.frozen = false;
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id, next, next]);
    settle(&mut m, &mut fx);

    // Nginx does not take it: tried again later, not at every event.
    fx.failing_refreshes = 1;
    m.on(certificate(), &mut fx);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed.len(), 4);
    settle(&mut m, &mut fx);
    assert!(m.refresh_due);
    let due = m.refresh_retry_at.unwrap();
    assert_eq!(due, fx.now + super::machine::REFRESH_RETRY);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed.len(), 4);
    fx.advance(super::machine::REFRESH_RETRY);
    assert_eq!(m.next_deadline(fx.now), Some(due));
    m.tick(&mut fx);
    assert_eq!(fx.refreshed, [id, next, next, next, next]);
    assert!(!m.refresh_due);
}

#[test]
fn a_version_taken_over_has_its_site_rendered_again_once_and_only_taken_if_it_differs() {
    let mut fx = Fake::new();
    let mut m = machine();
    let id = serve(&mut m, &mut fx, 1, WEB);
    // As `adopt.rs` leaves a machine that took a serving version over.
    m.rewrite_due = true;
    assert_eq!(m.next_deadline(fx.now), Some(fx.now), "due at once");
    m.tick(&mut fx);
    assert_eq!(
        (fx.refreshed.as_slice(), fx.rewritten),
        ([id].as_slice(), 1)
    );
    assert!(!m.rewrite_due);
    settle(&mut m, &mut fx);
    m.tick(&mut fx);
    assert_eq!(fx.refreshed.len(), 1, "once");
    // A certificate's refresh is always taken, and does the rewrite's work too.
    m.rewrite_due = true;
    m.on(
        Event::Certificate {
            hosts: "app.example.com".into(),
        },
        &mut fx,
    );
    m.tick(&mut fx);
    assert_eq!((fx.refreshed.len(), fx.rewritten), (2, 1));
    assert!(!m.rewrite_due && !m.refresh_due);
}

#[test]
fn a_stop_during_readiness_is_reported_as_stopped_and_completes_once_the_versions_are() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let v2 = to_readiness(&mut m, &mut fx, 2);
    m.step(vec![Event::Command(Command::Stop)], &mut fx);
    let last = m.report(0, fx.wall).last_deploy.unwrap();
    assert_eq!(last.result, DeployResult::Stopped);
    assert_eq!(fx.finished.last(), Some(&DeployResult::Stopped));
    // Out of Nginx at once; stopped only once both versions are.
    assert_eq!(fx.removed_site, 1);
    assert!(fx.discarded.contains(&v2));
    assert!(
        !fx.discarded.contains(&v1),
        "the serving version was stopped before it was out of Nginx"
    );
    let host = |names: &[&str]| Some(names.iter().map(|h| h.to_string()).collect());
    assert_eq!(
        fx.hosts_used,
        host(&["app.example.com"]),
        "the hosts were given back while Nginx still routed them here"
    );
    assert_eq!(m.report(0, fx.wall).state, AppState::Stopping);
    assert!(fx.stopped.is_empty());
    // A deploy meanwhile waits for the stop, and then goes ahead.
    let path = fx.bundle(3);
    m.step(
        vec![Event::Command(Command::Deploy { path, retry: false })],
        &mut fx,
    );
    let prepares = fx.prepares.len();
    settle(&mut m, &mut fx);
    assert!(fx.discarded.contains(&v1));
    assert_eq!(fx.hosts_used, host(&[]));
    assert_eq!(fx.stopped, [4]);
    assert_eq!(
        fx.prepares.len(),
        prepares + 1,
        "the deploy received meanwhile was dropped"
    );
}

#[test]
fn commands_queued_together_are_merged_and_a_shutdown_among_them_wins() {
    let (mut m, mut fx) = (machine(), Fake::new());
    let (a, b) = (fx.bundle(1), fx.bundle(2));
    m.step(
        vec![
            Event::Command(Command::Deploy {
                path: a,
                retry: false,
            }),
            Event::Command(Command::Stop),
            Event::Command(Command::Deploy {
                path: b,
                retry: false,
            }),
        ],
        &mut fx,
    );
    // Only the newest was acted on; every command is counted.
    assert_eq!(fx.prepares.len(), 1);
    assert_eq!(m.commands, 3);
    let (tx, rx) = crossbeam_channel::bounded(1);
    let path = fx.bundle(3);
    m.step(
        vec![
            Event::Command(Command::Deploy { path, retry: false }),
            Event::Shutdown,
            Event::Handover(Handover::Freeze(tx)),
        ],
        &mut fx,
    );
    assert_eq!(
        fx.prepares.len(),
        1,
        "a command before a shutdown was acted on"
    );
    assert!(matches!(m.life, Life::Stopping { exit: true, .. }));
    drop(rx);
}

#[test]
fn a_restart_deploys_the_serving_bundle_again_and_answers_once_switched() {
    let (mut m, mut fx) = (machine(), Fake::new());
    // Nothing serves: refused at once.
    let path = fx.bundle(1);
    let (reply, answer) = crate::app::Reply::channel();
    m.on(
        Event::Command(Command::Restart {
            path: path.clone(),
            reply,
        }),
        &mut fx,
    );
    assert!(matches!(answer.try_recv(), Ok(Err(m)) if m.to_string().contains("no version serves")));
    let v1 = serve(&mut m, &mut fx, 1, WEB);
    let (reply, answer) = crate::app::Reply::channel();
    m.on(
        Event::Command(Command::Restart {
            path: path.clone(),
            reply,
        }),
        &mut fx,
    );
    let job = fx.prepares.last().unwrap();
    assert_eq!(
        job.serving_sha256, None,
        "a restart must not be found unchanged"
    );
    assert!(answer.try_recv().is_err(), "answered before the switch");
    let id = job.id;
    for e in [
        Event::Prepared {
            id,
            result: Ok(Prepared::Version(Box::new(version(id, 1, WEB)))),
        },
        Event::Ready {
            version: id,
            result: Ok(()),
        },
        Event::Switched {
            version: id,
            result: Ok(()),
        },
    ] {
        m.on(e, &mut fx);
    }
    assert!(matches!(answer.try_recv(), Ok(Ok(m)) if m.contains("restarted")));
    assert!(matches!(m.life, Life::Serving(ref v) if v.id == id && id != v1));
    // Another file in incoming/ is no restart of the serving version.
    let other = fx.bundle(2);
    let (reply, answer) = crate::app::Reply::channel();
    m.on(
        Event::Command(Command::Restart { path: other, reply }),
        &mut fx,
    );
    assert!(
        matches!(answer.try_recv(), Ok(Err(m)) if m.to_string().contains("is not the bundle serving"))
    );
    assert!(matches!(m.life, Life::Serving(_)));
}
