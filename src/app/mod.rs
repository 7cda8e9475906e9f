//! One app's worker: a thread that owns the app's processes, ports and folders and takes them
//! through their life (README, "How a deploy works" and "Supervision"): unpack, provision,
//! start, readiness, switch, drain, stop, and crash restarts in between.
//!
//! The worker's life is an explicit state machine (`machine.rs`; drawn in
//! `docs/lifecycle.md`). Commands reach the worker over its channel, together with the exits
//! of its processes and the results of the deploy's stages, which run on threads of their
//! own (`deploy.rs`), so one loop supervises the serving version while a deploy runs. While a
//! deploy runs only the newest pending command is kept, and a newer command supersedes a
//! deploy that has not switched yet (Keter #64/#294: redeploys got stuck behind a
//! crash-looping version). Whatever fails, the version that was serving keeps serving.

mod adopt;
mod autorollback;
mod deploy;
mod error;
mod freeze;
mod health;
mod machine;
pub mod maintenance;
mod record;
pub mod releases;
mod site;
mod supervise;
#[cfg(test)]
mod tests;
mod version;
mod world;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::applog::{AppLog, LogTarget};
use crate::config::Config;
use crate::isolation::Isolation;
use crate::journal::Journal;
use crate::names::{AppName, Hostname};
use crate::nginx::NginxHandle;
use crate::ports::PortPool;
use crate::postgres::Provisioner;
use crate::process::{Running, Spec};
use crate::report::{DeployResult, Reports};

pub use adopt::{Adopted, Inherited, Recovery, recover};
use deploy::{Check, PrepareJob, SwitchJob};
pub use error::{DeployError, NotReady};
use machine::{Event, Handover, Machine};
pub use record::{FORMAT as RECORD_FORMAT, Mono};
pub use site::{CertSource, SiteSource, site_of};
use version::{FileStamp, Version};

/// What the daemon asks of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Deploy the bundle at this path: a no-op if it is the file already serving, or the file
    /// whose deploy failed last (an unchanged bad bundle is not retried at every event)
    /// unless `retry` (a rescan on SIGHUP) says to try again.
    Deploy { path: PathBuf, retry: bool },
    /// Stop the app: remove its Nginx file, then stop every version.
    Stop,
    /// Start fresh processes of the serving version and switch to them, the way a deploy of
    /// a changed bundle does (`keter restart`, README "Running keter"): the bundle at `path`
    /// is deployed even though its content is the serving one's. Refused when that file is
    /// not the serving version's, or when no version serves or a deploy is under way.
    Restart { path: PathBuf, reply: Reply },
    /// Turn maintenance on (with the operator's message) or off (`on: None`): the serving
    /// version's site is rendered again; answered once Nginx has it.
    Maintenance {
        on: Option<maintenance::Maintenance>,
        reply: Reply,
    },
    /// Deploy an earlier release again (`keter rollback`, README "Releases and rollback"):
    /// release `to`, or the one before the serving release; its kept bundle is put at `path`
    /// (`incoming/NAME.keter`, the source of truth) and deployed from there. `by` asked.
    Rollback {
        path: PathBuf,
        to: Option<u64>,
        by: u32,
        reply: Reply,
    },
}

/// How an operator's request to a worker ended, as the control socket tells it
/// (`src/control/`): the text of the outcome, or why it was not done.
pub type Outcome = Result<String, Refusal>;

/// Why an operator's request was not done. Its text is what the command line prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The worker refused the command, or the deploy it started did not go live: `not` says
    /// what was not done (`not rolled back`, `not restarted`), `why` why.
    NotDone {
        app: AppName,
        not: &'static str,
        why: String,
    },
    /// A newer maintenance command came before Nginx took this one's site.
    Superseded { app: AppName },
    /// Nginx did not take the site with (or without) the maintenance page; the worker tries
    /// again in `retry`.
    SiteNotTaken {
        app: AppName,
        error: String,
        retry: Duration,
    },
    /// keter is stopping: the request reached no worker.
    Stopping,
    /// The worker did not answer within `after`; the status shows how it ends.
    UnderWay { app: String, after: Duration },
    /// The worker dropped the request unanswered ([`Reply`]).
    Dropped { app: String },
    /// No app of that name is deployed.
    NoSuchApp { app: String },
    /// Refused before it reached a worker (by the daemon or the control socket): the text
    /// says why.
    Refused(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotDone { app, not, why } => write!(f, "{app}: {not}: {why}"),
            Refusal::Superseded { app } => {
                write!(f, "{app}: superseded by a newer maintenance command")
            }
            Refusal::SiteNotTaken { app, error, retry } => write!(
                f,
                "{app}: Nginx did not take the site: {error}; keter tries again in {} s",
                retry.as_secs()
            ),
            Refusal::Stopping => f.write_str("keter is stopping"),
            Refusal::UnderWay { app, after } => write!(
                f,
                "{app}: still under way after {} s; keter status shows how it ends",
                after.as_secs()
            ),
            Refusal::Dropped { app } => write!(
                f,
                "{app}: the request was dropped: a newer command for the app came first, or \
                 keter stopped or was upgraded meanwhile"
            ),
            Refusal::NoSuchApp { app } => write!(f, "{app}: no such app is deployed"),
            Refusal::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for Refusal {}

/// Where a worker answers an operator's request once it is done. Dropped unanswered (the
/// request was superseded by a newer command, or keter was upgraded meanwhile), the asker
/// sees its channel closed.
#[derive(Debug, Clone, Default)]
pub struct Reply(Option<Sender<Outcome>>);

impl Reply {
    /// A reply and the receiving end the asker waits on.
    pub fn channel() -> (Reply, Receiver<Outcome>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (Reply(Some(tx)), rx)
    }

    /// Answers that it was done, with `text`.
    pub fn done(&mut self, text: String) {
        self.send(Ok(text));
    }

    /// Answers why it was not done.
    pub fn refuse(&mut self, why: Refusal) {
        self.send(Err(why));
    }

    /// Answers (once; later answers go nowhere).
    fn send(&mut self, outcome: Outcome) {
        if let Some(tx) = self.0.take() {
            let _ = tx.try_send(outcome);
        }
    }
}

// Commands are compared by what they ask, not by who waits for the answer.
impl PartialEq for Reply {
    fn eq(&self, _: &Reply) -> bool {
        true
    }
}

impl Eq for Reply {}

/// What all workers share: the configuration and the single owners of ports, hosts and the
/// journal, a handle on the Nginx controller (which the daemon owns) and the reports (which the
/// status server reads).
pub struct Shared {
    pub config: Config,
    pub ports: PortPool,
    pub nginx: NginxHandle,
    pub journal: Journal,
    pub reports: Arc<Reports>,
    /// Which app serves each host (README, "Bundles": a host belongs to one app).
    pub hosts: Mutex<HashMap<Hostname, AppName>>,
    /// Numbers the unpack folders `temp/NAME-N` uniquely within this run.
    pub next_version: AtomicU64,
    /// The postgres plugin, when the global config has a `postgres` section.
    pub postgres: Option<Provisioner>,
    /// Who apps run as and what they may reach (the status server asks it too).
    pub isolation: Arc<Isolation>,
    /// The ACME thread, when the global config has an `acme` section: the certificates of
    /// `ssl: acme` stanzas (`docs/acme.md`).
    pub acme: Option<Arc<crate::acme::Acme>>,
}

impl Shared {
    pub fn new(
        config: Config,
        nginx: NginxHandle,
        journal: Journal,
        reports: Arc<Reports>,
        isolation: Arc<Isolation>,
        acme: Option<Arc<crate::acme::Acme>>,
    ) -> Shared {
        let ports = PortPool::new(config.port_range.clone());
        // keter's own status port is never an app's, even while the interface is not bound
        // yet (it is tried again every 10 s): Nginx would route an app's users to it.
        if let Some(crate::status::StatusAddress::Tcp(a)) = &config.status
            && config.port_range.contains(&a.port())
        {
            ports.claim(a.port());
        }
        Shared {
            ports,
            postgres: config
                .postgres
                .clone()
                .map(|admin| Provisioner::new(admin, &config.root)),
            config,
            nginx,
            journal,
            reports,
            hosts: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
            isolation,
            acme,
        }
    }
}

/// Everything the state machine does to the world, so that it can be driven with a fake
/// spawner and a fake clock (`world.rs` is the real one).
trait Effects {
    fn now(&self) -> Instant;
    /// The wall clock, for the moments the report and the record show.
    fn wall_clock(&self) -> std::time::SystemTime;
    /// The identity of the file at `path`, if there is one.
    fn stamp(&self, path: &Path) -> Option<FileStamp>;
    /// A version number unique within this run.
    fn next_id(&mut self) -> u64;
    fn readiness_timeout(&self) -> Duration;
    fn drain_time(&self) -> Duration;
    /// Starts the unpack stage; its result comes back as [`Event::Prepared`].
    fn prepare(&mut self, job: PrepareJob);
    /// Starts the readiness checks of a version; [`Event::Ready`] comes back.
    fn readiness(&mut self, version: u64, checks: Vec<Check>);
    /// Starts the switch; [`Event::Switched`] comes back.
    fn switch(&mut self, job: SwitchJob);
    /// Ends a version's readiness checks; what they last saw.
    fn cancel(&mut self, version: u64) -> String;
    /// Starts process `proc` of `version`; its exit comes back as [`Event::Exited`].
    fn spawn(&mut self, version: u64, proc: usize, spec: &Spec, label: &str)
    -> io::Result<Running>;
    /// After a leader's exit: starts the stage that stops what is left of its group and
    /// forgets it; [`Event::Reaped`] comes back.
    fn reap(&mut self, pid: i32);
    /// Process `proc` of version `version` just exited: `out of memory (limit ...)` when the
    /// kernel's OOM killer killed in its control group since it started (`src/cgroup.rs`).
    fn out_of_memory(&mut self, _version: u64, _proc: usize) -> Option<String> {
        None
    }
    /// Who uses `port`, for a webapp whose process group is led by `own` (`None` while it
    /// does not run), looking as closely as `look` says.
    fn port_use(
        &self,
        port: u16,
        own: Option<i32>,
        look: crate::ports::Look,
    ) -> crate::ports::PortUse;
    /// A port of the pool for a webapp that moves (`None` when none is free).
    fn acquire_port(&mut self) -> Option<u16>;
    /// Gives a port back to the pool, which hands it out again only once nobody holds it.
    fn release_port(&mut self, port: u16);
    /// Starts the stage that stops a version's processes, frees its ports and deletes its
    /// folder; [`Event::Discarded`] comes back.
    fn discard(&mut self, version: Box<Version>);
    /// Starts the stage that takes the app out of Nginx for a stop;
    /// [`Event::SiteRemoved`] comes back.
    fn leave_nginx(&mut self);
    /// True once nothing can reach an old version any more.
    fn drained(&self, version: &Version, age: Duration) -> bool;
    /// Gives back the app's hosts that are not in `used`.
    fn release_hosts(&mut self, used: &[&Hostname]);
    /// Starts the stage that has Nginx take the site of serving version `version` rendered
    /// again from `job` (a new certificate, a moved port), or, with `None`, the app's removal
    /// (a webapp without a port); with `unless_same`, only if the file comes out otherwise
    /// than the live one (a keter that took the app over). The change reaches the Nginx
    /// controller before this returns, so one started after it reaches it after it;
    /// [`Event::Refreshed`] comes back once Nginx answers.
    fn refresh_site(&mut self, version: u64, job: Option<SwitchJob>, unless_same: bool);
    /// No longer wants the certificates of host sets that are not in `used`.
    fn release_certificates(&mut self, used: &[crate::acme::HostSet]);
    /// A crash restart started a process again.
    fn restarted(&mut self);
    fn deploy_finished(&mut self, result: DeployResult, took: Duration);
    /// A line of keter's in the app's log.
    fn note(&mut self, line: &str);
    /// The app's last output lines, as a readiness failure shows them.
    fn last_output(&self) -> String;
    /// The app stopped after the `commands`-th command it received.
    fn stopped(&mut self, commands: u64);
    /// Publishes the app's report and writes its record (if it changed).
    fn publish(&mut self, report: crate::report::AppReport, record: record::AppRecord);
    /// Lines of the app's output dropped so far (the report shows it).
    fn log_lines_dropped(&self) -> u64;
    /// Answers the daemon's freeze or snapshot.
    fn answer(&mut self, reply: Sender<()>);
    /// How many releases keep their bundle (`keep-releases`).
    fn keep_releases(&self) -> usize;
    /// Writes the app's list of releases and deletes the kept bundles it no longer names.
    fn write_releases(&mut self, releases: &releases::Releases);
    /// Puts the kept bundle of content `sha256` at `path` (in `incoming/`), owned by `owner`
    /// as the file it was deployed from was.
    fn place_release(&mut self, sha256: &str, owner: u32, path: &Path) -> io::Result<()>;
    /// Keeps the app's maintenance state for a later keter.
    fn save_maintenance(&mut self, m: Option<&maintenance::Maintenance>);
    /// The global defaults of the health checks (`keter-config.yaml`).
    fn health_defaults(&self) -> crate::config::HealthChecks;
    /// Starts one health check off the worker's thread; [`Event::Checked`] comes back.
    fn health_check(&mut self, check: health::HealthCheck);
    /// Starts the stage that stops a process group that is not part of a version being
    /// stopped (an unhealthy webapp replaced, a fresh one not ready): SIGTERM, SIGKILL at
    /// `stop-timeout`; [`Event::Reaped`] comes back.
    fn stop_process(&mut self, pid: i32);
    /// An unhealthy webapp was replaced (counted for `/metrics`).
    fn health_replaced(&mut self);
    /// The global keys of automatic rollback (`keter-config.yaml`).
    fn rollback_defaults(&self) -> crate::config::AutoRollback;
    /// The failed requests of the app's deploy number `deploy`, switched to at `switched`,
    /// beside the app's over as long before (`requests::Requests::errors_since_switch`).
    fn errors_since_switch(
        &self,
        deploy: u64,
        switched: std::time::SystemTime,
    ) -> Option<crate::requests::ErrorsBeside>;
}

/// The sending end of a worker's queue of events. They travel boxed: the queue (an unbounded
/// channel) keeps them in blocks of 31 slots, one block for as long as the app runs, and an
/// event inline (a deploy's error) made that block 4 KiB per app.
#[derive(Clone)]
pub(super) struct EventSender(Sender<Box<Event>>);

impl EventSender {
    fn send(&self, event: Event) -> Result<(), crossbeam_channel::SendError<Box<Event>>> {
        self.0.send(Box::new(event))
    }
}

/// The daemon's handle on one app's worker thread.
pub struct AppHandle {
    tx: EventSender,
    thread: Option<JoinHandle<()>>,
    /// Commands sent, to tell a stop that answers the last of them from an older one.
    sent: u64,
}

impl AppHandle {
    /// Starts the worker thread of `name`. `on_stopped` is called (on the worker's thread)
    /// with the number of commands received when the app has stopped after a
    /// [`Command::Stop`]: if that is every command sent, the daemon may end the worker
    /// ([`AppHandle::stopped_after`]).
    pub fn spawn(
        name: AppName,
        shared: Arc<Shared>,
        on_stopped: Box<dyn Fn(u64) + Send>,
    ) -> io::Result<AppHandle> {
        let machine = Machine::new(name.clone());
        AppHandle::start(machine, Vec::new(), Vec::new(), shared, on_stopped)
    }

    /// Starts the worker of an app taken over from an earlier keter, watching its processes
    /// from now on.
    pub fn adopt(
        adopted: Adopted,
        shared: Arc<Shared>,
        on_stopped: Box<dyn Fn(u64) + Send>,
    ) -> io::Result<AppHandle> {
        AppHandle::start(
            adopted.machine,
            adopted.watches,
            adopted.drains,
            shared,
            on_stopped,
        )
    }

    fn start(
        mut machine: Machine,
        watches: Vec<adopt::Watch>,
        drains: Vec<adopt::Pipe>,
        shared: Arc<Shared>,
        on_stopped: Box<dyn Fn(u64) + Send>,
    ) -> io::Result<AppHandle> {
        let name = machine.name.clone();
        // The releases an earlier keter (or this one, before the app was stopped) kept.
        machine.releases = releases::Releases::load(&shared.config.root, &name);
        machine.maintenance = maintenance::load(&shared.config.root, &name);
        let (tx, rx) = unbounded();
        let tx = EventSender(tx);
        let config = &shared.config;
        let target = if config.rotate_logs {
            LogTarget::File {
                path: config.root.join("log").join(format!("app-{name}.log")),
                max_bytes: config.log_rotate_bytes,
                keep: config.log_rotate_keep,
            }
        } else {
            LogTarget::Stderr(name.to_string())
        };
        let log = AppLog::open(target)?;
        shared.reports.attach_log(&name, log.clone());
        let mut world = world::World::new(name.clone(), shared, log, tx.clone(), on_stopped);
        for w in watches {
            world.watch(w);
        }
        for (pipe, partial) in drains {
            if let Err(e) = crate::childwatch::output_continued(pipe, world.log.clone(), partial) {
                log::error!("{name}: cannot read the output left by an ended process: {e}");
            }
        }
        // Boxed: moved by value into the thread, each would be copied into several of its
        // frames, which an idle worker keeps resident.
        let (machine, world) = (Box::new(machine), Box::new(world));
        let thread = std::thread::Builder::new()
            .name(format!("app-{name}"))
            .spawn(move || run(machine, world, rx))?;
        Ok(AppHandle {
            tx,
            thread: Some(thread),
            sent: 0,
        })
    }

    pub fn send(&mut self, command: Command) {
        self.sent += 1;
        let _ = self.tx.send(Event::Command(command));
    }

    /// True when a stop reported after `commands` commands answers every command sent.
    pub fn stopped_after(&self, commands: u64) -> bool {
        commands == self.sent
    }

    /// Asks the worker to come to rest for an in-place upgrade; the answer comes once nothing
    /// is in flight.
    pub fn freeze(&self) -> Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.tx.send(Event::Handover(Handover::Freeze(tx)));
        rx
    }

    /// Asks the frozen worker to write its record and then wait; answered once written.
    pub fn snapshot(&self) -> Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.tx.send(Event::Handover(Handover::Snapshot(tx)));
        rx
    }

    /// The upgrade did not happen: the worker carries on.
    pub fn thaw(&self) {
        let _ = self.tx.send(Event::Handover(Handover::Thaw));
    }

    /// Asks the worker to stop everything; [`AppHandle::join`] waits for it.
    pub fn begin_shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }

    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The worker's loop: the next event (with every other already queued) or, at the machine's
/// next deadline, a tick, handed to the machine ([`Machine::step`]), until it has ended.
fn run(mut machine: Box<Machine>, mut world: Box<world::World>, rx: Receiver<Box<Event>>) {
    machine.publish(&mut *world);
    while !machine.ended() {
        let first = match machine.next_deadline(Instant::now()) {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(e) => *e,
                Err(RecvTimeoutError::Timeout) => Event::Tick,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(e) => *e,
                Err(_) => break,
            },
        };
        let mut events = vec![first];
        events.extend(rx.try_iter().map(|e| *e));
        machine.step(events, &mut *world);
        if world.stack_unused() {
            crate::memory::release_stack();
        }
    }
    world.join_stages();
    // Stopped (the bundle was deleted, or keter stops): nothing of the app is left to take
    // over.
    world.forget_record();
}
