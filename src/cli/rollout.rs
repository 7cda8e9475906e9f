//! Commands on several keter hosts over the system's OpenSSH client (README "Several hosts"):
//! `keter deploy BUNDLE --hosts HOST[,HOST...]` rolls one bundle out, and `keter rollback NAME
//! [RELEASE] --hosts HOST[,HOST...]` rolls an app back, on each host in turn. One engine runs
//! both: the same hosts syntax and options, the same order, stop at the first failure, progress
//! lines, table, JSON and exit codes; only each host's middle step differs ([`Action`]).
//!
//! keter stays a per-host agent: these commands only do what an operator would do by hand on
//! each host, in turn, with their own keys and `~/.ssh/config`. Per host, two SSH sessions:
//!
//! 1. **connect**: for a deploy, read the host's keter configuration (`-c`, the package's by
//!    default) to learn its root, hence its `incoming/`; for a rollback, read the host's
//!    release list (`keter releases NAME --json`), from which the release to go back to is
//!    chosen by the rule the host's keter itself follows (`Releases::previous` in
//!    `src/app/releases.rs`), or found by its sha256;
//! 2. the host's step, then **wait**, in one session: read the app's status before anything
//!    changes, then
//!    * **copy** (deploy): receive the bundle on stdin under a name keter's daemon ignores (a
//!      leading dot, not ending in `.keter`: see `reconcile` in `src/daemon.rs`), check its
//!      sha256, rename it to `NAME.keter` in the same folder (so the daemon never sees a
//!      half-written bundle);
//!    * **rollback**: run the host's `keter rollback NAME N` with the release chosen (its
//!      number on that host), which returns once the host's keter has deployed it or failed;
//!
//!    then print `keter status --json` every 200 ms until this side has its answer: the
//!    bundle's sha256 serving, or the host's deploy failed, or the timeout.
//!
//! The first host that fails stops the rollout: no host is started after it, and the hosts not
//! reached keep what they serve. A bundle is checked here first (`keter check`'s reading, see
//! [`super::commands::check_for_hosts`]), before anything is copied.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::commands;
use crate::config::DEFAULT_CONFIG_PATH;

/// How long a host's keter has, from the rename into `incoming/`, to report the bundle serving;
/// for a rollback, the host's `keter rollback` has as long, and then its status as long again.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The environment variable naming the SSH command (program and its own arguments, split on
/// whitespace), as `GIT_SSH_COMMAND` does for git; `ssh` when unset.
pub const SSH_COMMAND_VAR: &str = "KETER_SSH_COMMAND";

/// Exit code when a host failed and the rollout stopped (1: the bundle failed the local check).
pub const EXIT_STOPPED: u8 = 3;

/// Marks the lines of the remote script's own output, between what `cat` and `keter status`
/// print.
const MARK: &str = "@@keter-deploy";

/// What is done on each host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `keter deploy BUNDLE`: the bundle copied into each host's `incoming/`.
    Deploy { bundle: PathBuf },
    /// `keter rollback NAME [RELEASE]`: each host's keter deploys an earlier release of the
    /// app again: the one before its serving release by its own list, or the release whose
    /// bundle has this sha256 (a prefix of at least [`MIN_SHA256_PREFIX`] hex digits; release
    /// numbers differ from host to host, a bundle's sha256 does not).
    Rollback { app: String, sha256: Option<String> },
}

/// The shortest sha256 prefix `keter rollback NAME RELEASE --hosts` takes as RELEASE: long
/// enough never to be read as a release number by mistake.
pub const MIN_SHA256_PREFIX: usize = 8;

/// `keter deploy` or `keter rollback --hosts`, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub action: Action,
    pub hosts: Vec<String>,
    pub parallel: usize,
    pub timeout: Duration,
    /// The keter configuration on the hosts.
    pub config: PathBuf,
    pub json: bool,
}

/// Whether `keter rollback`'s argument is one of the options that make it act on several
/// hosts (then [`parse_rollback`] reads the command line, not the one-host parser).
pub fn is_hosts_option(arg: &str) -> bool {
    let name = arg.split_once('=').map_or(arg, |(n, _)| n);
    matches!(name, "-H" | "--hosts" | "--parallel" | "--timeout")
}

/// Parses the arguments after `deploy`: `Ok(None)` asks for the help text.
pub fn parse_deploy(args: &[String]) -> Result<Option<Plan>, String> {
    let Some((positional, plan)) = parse_options(args, "keter deploy")? else {
        return Ok(None);
    };
    let bundle = match positional.as_slice() {
        [b] => PathBuf::from(b),
        [] => return Err("keter deploy needs a BUNDLE (NAME.keter)".into()),
        more => {
            return Err(format!(
                "keter deploy takes one BUNDLE, and hosts with --hosts: {} are not options",
                more.join(" ")
            ));
        }
    };
    Ok(Some(Plan {
        action: Action::Deploy { bundle },
        ..plan
    }))
}

/// Parses the arguments after `rollback` when they name hosts: `Ok(None)` asks for the help
/// text.
pub fn parse_rollback(args: &[String]) -> Result<Option<Plan>, String> {
    let Some((positional, plan)) = parse_options(args, "keter rollback")? else {
        return Ok(None);
    };
    let (app, release) = match positional.as_slice() {
        [app] => (app, None),
        [app, release] => (app, Some(release)),
        [] => return Err("keter rollback needs the app's NAME".into()),
        more => {
            return Err(format!(
                "keter rollback takes NAME and optionally RELEASE, and hosts with --hosts: {} are not options",
                more.join(" ")
            ));
        }
    };
    let app = crate::names::AppName::new(app)
        .map_err(|e| format!("keter rollback: {app:?} is not an app's name: {e}"))?;
    let sha256 = match release {
        None => None,
        Some(r) => Some(sha256_prefix(r).map_err(|e| e.to_string())?),
    };
    Ok(Some(Plan {
        action: Action::Rollback {
            app: app.to_string(),
            sha256,
        },
        ..plan
    }))
}

/// RELEASE across hosts: a sha256 or its first [`MIN_SHA256_PREFIX`] or more hex digits.
fn sha256_prefix(release: &str) -> Result<String, ArgError> {
    let hex = release.len() <= 64 && release.chars().all(|c| c.is_ascii_hexdigit());
    if hex && release.len() >= MIN_SHA256_PREFIX {
        return Ok(release.to_ascii_lowercase());
    }
    Err(ArgError::NotASha256 {
        release: release.to_string(),
    })
}

/// An argument of `--hosts` or RELEASE that cannot name what it must; the command line
/// prints it above the help text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ArgError {
    /// RELEASE across hosts is not a sha256 or a long enough prefix of one.
    NotASha256 { release: String },
    /// `--hosts` has an empty name (`web1,,web2`).
    EmptyHost,
    /// A host that `ssh` would take as an option, or that holds a space or a control character.
    NotAHost { host: String },
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgError::NotASha256 { release } => write!(
                f,
                "RELEASE {release:?}: with --hosts, RELEASE is the sha256 of the release's bundle, \
                 or its first {MIN_SHA256_PREFIX} or more hex digits (as keter releases shows it): \
                 a release's number differs from host to host, its sha256 does not"
            ),
            ArgError::EmptyHost => f.write_str("--hosts has an empty host name"),
            ArgError::NotAHost { host } => write!(
                f,
                "--hosts: {host:?} is not a host: it starts with '-' or holds a space or a control character"
            ),
        }
    }
}

impl std::error::Error for ArgError {}

/// The options both commands take; the other arguments are returned in order. `Ok(None)` asks
/// for the help text. The plan's action is a placeholder for the caller to set.
fn parse_options(args: &[String], command: &str) -> Result<Option<(Vec<String>, Plan)>, String> {
    let mut positional: Vec<String> = Vec::new();
    let mut hosts: Vec<String> = Vec::new();
    let mut parallel = 1;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let mut json = false;
    let mut args = args.iter();
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name {
            "-h" | "--help" => return Ok(None),
            "--json" => json = true,
            "-H" | "--hosts" => {
                for host in value()?.split(',') {
                    hosts.push(check_host(host).map_err(|e| e.to_string())?);
                }
            }
            "--parallel" => {
                let v = value()?;
                parallel = match v.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(format!("--parallel {v:?}: a number of hosts, 1 or more")),
                }
            }
            "--timeout" => {
                let v = value()?;
                timeout = match v.parse::<f64>() {
                    Ok(s) if s > 0.0 && s.is_finite() => Duration::from_secs_f64(s),
                    _ => return Err(format!("--timeout {v:?}: a number of seconds above 0")),
                }
            }
            "-c" | "--config" => config = PathBuf::from(value()?),
            _ if a.starts_with('-') && a.len() > 1 => return Err(format!("unknown option {a}")),
            _ => positional.push(a.clone()),
        }
    }
    if hosts.is_empty() {
        return Err(format!("{command} needs --hosts HOST[,HOST...]"));
    }
    if let Some(h) = hosts
        .iter()
        .enumerate()
        .find(|(i, h)| hosts[..*i].contains(h))
    {
        return Err(format!("--hosts names {} twice", h.1));
    }
    let plan = Plan {
        action: Action::Deploy {
            bundle: PathBuf::new(),
        },
        hosts,
        parallel,
        timeout,
        config,
        json,
    };
    Ok(Some((positional, plan)))
}

/// A host as `ssh` takes it: `[USER@]HOST`, an alias of `~/.ssh/config`, or
/// `ssh://[USER@]HOST[:PORT]`. Never an option, never blank.
fn check_host(host: &str) -> Result<String, ArgError> {
    let host = host.trim();
    if host.is_empty() {
        return Err(ArgError::EmptyHost);
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ArgError::NotAHost {
            host: host.to_string(),
        });
    }
    Ok(host.to_string())
}

/// The step a host is at, or failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connect,
    Copy,
    Rollback,
    Wait,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Copy => "copy",
            Step::Rollback => "rollback",
            Step::Wait => "wait",
        }
    }
}

/// How a host ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Serving,
    /// SSH could not reach the host: its own error.
    Unreachable(String),
    Failed(Step, String),
    /// Not started: the rollout stopped before this host.
    NotReached,
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Serving => "serving",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::Failed(..) => "failed",
            Outcome::NotReached => "not reached",
        }
    }
}

/// What a host's keter is to serve: the bundle's sha256 and, for a rollback, the number of
/// the release chosen on that host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    sha256: String,
    release: Option<u64>,
}

#[derive(Debug, Clone)]
struct HostReport {
    host: String,
    outcome: Outcome,
    started: Duration,
    finished: Duration,
    /// Time spent in each step that ran.
    steps: Vec<(Step, Duration)>,
    /// What the host was to serve, once known.
    target: Option<Target>,
}

/// The bundle `keter deploy` rolls out, checked here.
struct Bundle<'a> {
    path: &'a Path,
    file_name: String,
    sha256: String,
    size: u64,
}

/// What each host does between connect and wait.
enum Work<'a> {
    Deploy(Bundle<'a>),
    /// Back to the release before the serving one, or to the release of this sha256 prefix.
    Rollback {
        sha256: Option<&'a str>,
    },
}

/// What every host's run shares.
struct Rollout<'a> {
    ssh: Vec<String>,
    work: Work<'a>,
    app: String,
    config: &'a Path,
    timeout: Duration,
    start: Instant,
}

/// What a host's second session does, from what the first one read.
enum Next {
    Session {
        script: String,
        target: Target,
        /// The progress line once connected.
        what: String,
    },
    /// A rollback to a bundle the host serves already.
    Serving(Target),
}

/// Runs `keter deploy` or `keter rollback --hosts`.
pub fn run(plan: &Plan) -> ExitCode {
    let start = Instant::now();
    let (app, work) = match &plan.action {
        Action::Deploy { bundle } => match checked_bundle(bundle) {
            Some((app, bundle)) => (app, Work::Deploy(bundle)),
            None => return ExitCode::from(1),
        },
        Action::Rollback { app, sha256 } => (
            app.clone(),
            Work::Rollback {
                sha256: sha256.as_deref(),
            },
        ),
    };
    let ssh = match ssh_command() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keter: {e}");
            return ExitCode::from(1);
        }
    };
    let rollout = Rollout {
        ssh,
        work,
        app,
        config: &plan.config,
        timeout: plan.timeout,
        start,
    };
    let (hosts, at_a_time) = (plan.hosts.len(), plan.parallel.min(plan.hosts.len()));
    let plural = if hosts == 1 { "" } else { "s" };
    match &rollout.work {
        Work::Deploy(b) => eprintln!(
            "keter: deploying {} (sha256 {}, {}) to {hosts} host{plural}, {at_a_time} at a time",
            b.path.display(),
            short(&b.sha256),
            mib(b.size),
        ),
        Work::Rollback { sha256 } => eprintln!(
            "keter: rolling {} back on {hosts} host{plural}, {at_a_time} at a time, to {}",
            rollout.app,
            match sha256 {
                Some(s) => format!("the release of sha256 {s}"),
                None => "the release before the one each host serves".into(),
            }
        ),
    }
    let reports = roll(&rollout, &plan.hosts, plan.parallel);
    let ok = reports.iter().all(|r| r.outcome == Outcome::Serving);
    if plan.json {
        println!("{}", json_report(&rollout, plan, &reports, ok));
    } else {
        print!("{}", table(&rollout, &reports));
        if !ok {
            let failed = reports
                .iter()
                .find(|r| matches!(r.outcome, Outcome::Failed(..) | Outcome::Unreachable(_)));
            if let Some(f) = failed {
                eprintln!(
                    "keter: the {} stopped at {}: {}",
                    rollout.noun(),
                    f.host,
                    rollout.error_of(&f.outcome).unwrap_or_default()
                );
            }
        }
    }
    if let Some(differ) = different_targets(&reports) {
        eprintln!("keter: warning: {differ}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_STOPPED)
    }
}

/// The bundle `keter deploy` names, checked here (errors printed): its app and what the hosts
/// need of it.
fn checked_bundle(path: &Path) -> Option<(String, Bundle<'_>)> {
    let (app, sha256, warnings) = match commands::check_for_hosts(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "keter: {}: not deployed: the bundle has errors (nothing was copied)",
                path.display()
            );
            return None;
        }
    };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bundle = Bundle {
        path,
        file_name: format!("{app}.keter"),
        sha256,
        size,
    };
    Some((app.to_string(), bundle))
}

/// Hosts that went back to different bundles (their release lists differ), said once.
fn different_targets(reports: &[HostReport]) -> Option<String> {
    let served: Vec<(&str, &Target)> = reports
        .iter()
        .filter(|r| r.outcome == Outcome::Serving)
        .filter_map(|r| Some((r.host.as_str(), r.target.as_ref()?)))
        .filter(|(_, t)| t.release.is_some())
        .collect();
    let first = served.first()?.1;
    if served.iter().all(|(_, t)| t.sha256 == first.sha256) {
        return None;
    }
    Some(format!(
        "the hosts went back to different bundles, as their own release lists have it: {}",
        served
            .iter()
            .map(|(h, t)| format!(
                "{h} release {} (sha256 {})",
                t.release.unwrap_or_default(),
                short(&t.sha256)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Runs the hosts, `parallel` at a time, in order; no host starts once one has failed.
fn roll(rollout: &Rollout, hosts: &[String], parallel: usize) -> Vec<HostReport> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let reports: Mutex<Vec<Option<HostReport>>> = Mutex::new(vec![None; hosts.len()]);
    std::thread::scope(|s| {
        for _ in 0..parallel.min(hosts.len()) {
            s.spawn(|| {
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(host) = hosts.get(i) else { return };
                    let report = run_host(rollout, host);
                    if report.outcome != Outcome::Serving {
                        stop.store(true, Ordering::SeqCst);
                    }
                    reports.lock().unwrap()[i] = Some(report);
                }
            });
        }
    });
    let reports = reports.into_inner().unwrap();
    hosts
        .iter()
        .zip(reports)
        .map(|(host, r)| {
            r.unwrap_or_else(|| HostReport {
                host: host.clone(),
                outcome: Outcome::NotReached,
                started: Duration::ZERO,
                finished: Duration::ZERO,
                steps: Vec::new(),
                target: None,
            })
        })
        .collect()
}

/// One host: connect, its step, wait. Prints a progress line at each step.
fn run_host(rollout: &Rollout, host: &str) -> HostReport {
    let started = rollout.start.elapsed();
    let mut steps = Vec::new();
    let mut target = None;
    let outcome = host_steps(rollout, host, &mut steps, &mut target);
    let finished = rollout.start.elapsed();
    let took = finished - started;
    match (&outcome, &target) {
        (Outcome::Serving, Some(t)) => progress(
            rollout,
            host,
            &format!(
                "serving sha256 {}{} ({}s on this host)",
                short(&t.sha256),
                t.release
                    .map(|n| format!(", release {n}"))
                    .unwrap_or_default(),
                secs(took)
            ),
        ),
        (other, _) => progress(
            rollout,
            host,
            &format!(
                "{} ({}s on this host)",
                rollout.error_of(other).unwrap_or_default(),
                secs(took)
            ),
        ),
    }
    HostReport {
        host: host.to_string(),
        outcome,
        started,
        finished,
        steps,
        target,
    }
}

fn host_steps(
    rollout: &Rollout,
    host: &str,
    steps: &mut Vec<(Step, Duration)>,
    target: &mut Option<Target>,
) -> Outcome {
    // 1. connect: the host's root, or its releases.
    let t = Instant::now();
    progress(rollout, host, "connecting");
    let out = match rollout
        .command(host, &rollout.connect_script())
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            return Outcome::Failed(Step::Connect, format!("cannot run {}: {e}", rollout.ssh[0]));
        }
    };
    steps.push((Step::Connect, t.elapsed()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(255) {
        return Outcome::Unreachable(ssh_error(&stderr, out.status.code()));
    }
    if !out.status.success() {
        let what = match rollout.work {
            Work::Deploy(_) => format!("cannot read {} on the host", rollout.config.display()),
            Work::Rollback { .. } => format!("keter releases {} on the host", rollout.app),
        };
        return Outcome::Failed(
            Step::Connect,
            format!("{what}: {}", ssh_error(&stderr, out.status.code())),
        );
    }
    let next = rollout.next(&String::from_utf8_lossy(&out.stdout), t.elapsed());
    let (script, sha256) = match next {
        Err(outcome) => return outcome,
        Ok(Next::Serving(t)) => {
            progress(
                rollout,
                host,
                &format!(
                    "already serves sha256 {} (release {}): nothing to roll back",
                    short(&t.sha256),
                    t.release.unwrap_or_default()
                ),
            );
            *target = Some(t);
            return Outcome::Serving;
        }
        Ok(Next::Session {
            script,
            target: t,
            what,
        }) => {
            progress(rollout, host, &what);
            let sha256 = t.sha256.clone();
            *target = Some(t);
            (script, sha256)
        }
    };

    // 2. the host's step, then wait, in one session.
    let step = rollout.step();
    let t = Instant::now();
    // The bundle goes on the session's stdin.
    let input = match &rollout.work {
        Work::Deploy(b) => Some(b.path),
        Work::Rollback { .. } => None,
    };
    let mut child = match rollout
        .command(host, &script)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed(step, format!("cannot run {}: {e}", rollout.ssh[0]));
        }
    };
    let session = Session::start(&mut child, input);
    let outcome = follow(rollout, host, &session, t, steps, &sha256);
    let _ = child.kill();
    let status = child.wait().ok();
    let outcome = match outcome {
        Followed::Done(o) => o,
        Followed::Ended(ended) => {
            let code = status.and_then(|s| s.code());
            let stderr = session.finish();
            if code == Some(255) && ended == step {
                Outcome::Unreachable(ssh_error(&stderr, code))
            } else {
                Outcome::Failed(ended, ssh_error(&stderr, code))
            }
        }
    };
    if steps.last().is_none_or(|(s, _)| *s == Step::Connect) {
        steps.push((step, t.elapsed()));
    }
    outcome
}

/// How following the second session ended.
enum Followed {
    Done(Outcome),
    /// The session ended (or failed) during this step, before an answer.
    Ended(Step),
}

/// Reads the second session's output: the status before, the end of the host's step (`done`
/// and its exit code), then statuses, until the host serves `sha256` or fails.
fn follow(
    rollout: &Rollout,
    host: &str,
    session: &Session,
    t: Instant,
    steps: &mut Vec<(Step, Duration)>,
    sha256: &str,
) -> Followed {
    let step = rollout.step();
    let step_deadline = t + match rollout.work {
        // A large bundle over a slow link may take longer than keter takes to deploy it.
        Work::Deploy(_) => rollout.timeout.max(Duration::from_secs(600)),
        // The host's `keter rollback` returns once its keter has deployed the release.
        Work::Rollback { .. } => rollout.timeout,
    };
    let mut block = String::new();
    let mut before: Option<Value> = None;
    let mut done_at: Option<Instant> = None;
    let mut last_seen = String::from("no status read yet");
    loop {
        let deadline = match done_at {
            Some(c) => c + rollout.timeout,
            None => step_deadline,
        };
        let line = match session
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Some(l)) => l,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Followed::Ended(if done_at.is_some() { Step::Wait } else { step });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Followed::Done(match done_at {
                    Some(_) => Outcome::Failed(
                        Step::Wait,
                        format!(
                            "the host's keter did not report sha256 {} serving within {}s; it reports {last_seen}",
                            short(sha256),
                            secs(rollout.timeout)
                        ),
                    ),
                    None => Outcome::Failed(
                        step,
                        format!(
                            "{} did not finish within {}s",
                            match rollout.work {
                                Work::Deploy(_) => "the copy",
                                Work::Rollback { .. } => "the host's keter rollback",
                            },
                            secs(step_deadline - t)
                        ),
                    ),
                });
            }
        };
        let Some(mark) = line.strip_prefix(MARK) else {
            block.push_str(&line);
            block.push('\n');
            continue;
        };
        let text = std::mem::take(&mut block);
        let mark = mark.trim();
        match mark {
            "before" => {
                before = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| app_of(&v, &rollout.app).cloned());
            }
            m if m.starts_with("done") => {
                let took = t.elapsed();
                steps.push((step, took));
                // What the host's command printed, as printable text.
                let said = crate::applog::printable(text.trim()).into_owned();
                if m != "done 0" {
                    let said = if said.is_empty() {
                        format!("exited with {}", m.trim_start_matches("done").trim())
                    } else {
                        said
                    };
                    return Followed::Done(Outcome::Failed(step, said));
                }
                done_at = Some(Instant::now());
                let what = match rollout.work {
                    Work::Deploy(_) => {
                        format!("copied in {}s; waiting for keter to serve it", secs(took))
                    }
                    Work::Rollback { .. } => format!(
                        "keter rollback in {}s: {said}; waiting for keter status to report it",
                        secs(took)
                    ),
                };
                progress(rollout, host, &what);
            }
            m if m.starts_with("status") => {
                let Some(done) = done_at else { continue };
                let verdict = match serde_json::from_str::<Value>(&text) {
                    Ok(v) => verdict(app_of(&v, &rollout.app), before.as_ref(), sha256),
                    Err(_) => Verdict::Waiting(format!(
                        "no status (`keter status` said: {})",
                        crate::applog::printable(session.stderr().trim())
                    )),
                };
                match verdict {
                    Verdict::Waiting(seen) => last_seen = seen,
                    Verdict::Serving => {
                        steps.push((Step::Wait, done.elapsed()));
                        return Followed::Done(Outcome::Serving);
                    }
                    Verdict::Failed(e) => {
                        steps.push((Step::Wait, done.elapsed()));
                        return Followed::Done(Outcome::Failed(Step::Wait, e));
                    }
                }
            }
            _ => {}
        }
    }
}

/// What one status of the host says about the bundle.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Serving,
    /// Not yet; what the status shows.
    Waiting(String),
    Failed(String),
}

/// Reads the app's entry of `keter status --json` (`None`: not there yet) against the entry
/// before the copy: the bundle serves once its sha256 is the serving one and the app is not
/// crash-looping; a deploy that failed after the copy is this bundle's failure.
fn verdict(now: Option<&Value>, before: Option<&Value>, sha256: &str) -> Verdict {
    let Some(app) = now else {
        return Verdict::Waiting("the app is not there yet".into());
    };
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let state = text(app, "state").unwrap_or_default();
    let serving = text(app, "sha256");
    if serving.as_deref() == Some(sha256) {
        return match state.as_str() {
            "running" | "deploying" => Verdict::Serving,
            _ => Verdict::Failed(format!(
                "the bundle serves but the app is {state}: {}",
                text(app, "last_error").unwrap_or_else(|| "no error reported".into())
            )),
        };
    }
    // A failure reported after the copy is this bundle's. (A deploy superseded after the copy
    // may be one that was under way before it, superseded by this bundle: no verdict.)
    let last = app.get("last_deploy").filter(|d| d.is_object());
    let last_before = before.and_then(|b| b.get("last_deploy"));
    if let Some(last) = last
        && Some(last) != last_before
        && text(last, "result").as_deref() == Some("failed")
    {
        let error = text(last, "error").unwrap_or_else(|| "no error reported".into());
        let kind = text(last, "error_kind")
            .map(|k| format!(" ({k})"))
            .unwrap_or_default();
        return Verdict::Failed(format!("the host's keter failed the deploy{kind}: {error}"));
    }
    let stage = text(app, "deploy_stage")
        .map(|s| format!(", deploy stage {s}"))
        .unwrap_or_default();
    Verdict::Waiting(format!(
        "state {state}{stage}, serving sha256 {}",
        serving.as_deref().map(short).unwrap_or("none")
    ))
}

fn app_of<'v>(status: &'v Value, app: &str) -> Option<&'v Value> {
    status
        .get("apps")?
        .as_array()?
        .iter()
        .find(|a| a.get("name").and_then(Value::as_str) == Some(app))
}

/// The second SSH session's output, read on threads: stdout by lines, stderr whole.
struct Session {
    lines: mpsc::Receiver<Option<String>>,
    stderr: std::sync::Arc<Mutex<String>>,
    /// Closed when stderr is read to its end.
    stderr_done: mpsc::Receiver<()>,
}

impl Session {
    /// `input`: the file to write on the session's stdin.
    fn start(child: &mut Child, input: Option<&Path>) -> Session {
        if let (Some(mut stdin), Some(bundle)) = (child.stdin.take(), input) {
            let bundle = bundle.to_path_buf();
            std::thread::spawn(move || {
                // A host that stops reading (its script failed) ends the copy; the script's
                // own output says why.
                if let Ok(mut f) = std::fs::File::open(&bundle) {
                    let _ = std::io::copy(&mut f, &mut stdin);
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(Some(line)).is_err() {
                        return;
                    }
                }
                let _ = tx.send(None);
            });
        }
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let (done, stderr_done) = mpsc::channel::<()>();
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let _done = done;
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = sink.lock().unwrap();
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    // Only the end matters: keep the last 16 KiB.
                    if s.len() > 32 << 10 {
                        let cut = s.len() - (16 << 10);
                        let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                        s.replace_range(..cut, "");
                    }
                }
            });
        }
        Session {
            lines: rx,
            stderr,
            stderr_done,
        }
    }

    /// What SSH printed on stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// What SSH printed on stderr, to its end, once the session is over (waiting at most a
    /// second: a connection master that an operator's `ControlPersist` leaves behind may hold
    /// the pipe).
    fn finish(&self) -> String {
        let _ = self.stderr_done.recv_timeout(Duration::from_secs(1));
        self.stderr()
    }
}

fn ssh_command() -> Result<Vec<String>, String> {
    match std::env::var(SSH_COMMAND_VAR) {
        Ok(v) => {
            let words: Vec<String> = v.split_whitespace().map(String::from).collect();
            if words.is_empty() {
                Err(format!("{SSH_COMMAND_VAR} is set but empty"))
            } else {
                Ok(words)
            }
        }
        Err(_) => Ok(vec!["ssh".to_string()]),
    }
}

impl Rollout<'_> {
    /// `ssh [its own arguments] -o BatchMode=yes -- HOST SCRIPT`.
    fn command(&self, host: &str, script: &str) -> Command {
        let mut cmd = Command::new(&self.ssh[0]);
        cmd.args(&self.ssh[1..])
            // No password or passphrase prompt in the middle of a rollout: keys (or an agent).
            .args(["-o", "BatchMode=yes", "--", host, script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// The host's own step, between connect and wait.
    fn step(&self) -> Step {
        match self.work {
            Work::Deploy(_) => Step::Copy,
            Work::Rollback { .. } => Step::Rollback,
        }
    }

    /// What the whole is called in messages.
    fn noun(&self) -> &'static str {
        match self.work {
            Work::Deploy(_) => "rollout",
            Work::Rollback { .. } => "rollback",
        }
    }

    fn error_of(&self, outcome: &Outcome) -> Option<String> {
        match outcome {
            Outcome::Unreachable(e) => Some(format!("unreachable: {e}")),
            Outcome::Failed(step, e) => Some(format!("{} failed: {e}", step.name())),
            Outcome::NotReached => Some(format!(
                "not reached: the {} stopped before this host",
                self.noun()
            )),
            Outcome::Serving => None,
        }
    }

    /// The first session's script: for a deploy, print the configuration file, or say that it
    /// is a root folder (keter takes both); for a rollback, the app's releases.
    fn connect_script(&self) -> String {
        let c = quote(&self.config.to_string_lossy());
        match self.work {
            Work::Deploy(_) => format!(
                "C={c}; if [ -d \"$C\" ]; then echo '{MARK} folder'; else cat -- \"$C\"; fi"
            ),
            Work::Rollback { .. } => format!("keter releases {} --json -c {c}", quote(&self.app)),
        }
    }

    /// The second session, from what the first one printed (`connected`: how long it took).
    fn next(&self, output: &str, connected: Duration) -> Result<Next, Outcome> {
        let polls = self.polls();
        let c = quote(&self.config.to_string_lossy());
        match &self.work {
            Work::Deploy(bundle) => {
                let incoming = root_of(output, self.config)
                    .map_err(|e| Outcome::Failed(Step::Connect, e.to_string()))?
                    .join("incoming");
                Ok(Next::Session {
                    script: deploy_script(bundle, &c, &incoming, &polls),
                    target: Target {
                        sha256: bundle.sha256.clone(),
                        release: None,
                    },
                    what: format!(
                        "connected in {}s; copying {} into {}",
                        secs(connected),
                        mib(bundle.size),
                        incoming.display()
                    ),
                })
            }
            Work::Rollback { sha256 } => {
                let list = serde_json::from_str::<Value>(output).map_err(|e| {
                    Outcome::Failed(
                        Step::Connect,
                        format!(
                            "keter releases {} --json on the host printed something that is not JSON: {e}",
                            self.app
                        ),
                    )
                })?;
                let choice = choose(&list, *sha256).map_err(|e| {
                    Outcome::Failed(
                        Step::Rollback,
                        format!("{e} (keter releases {} on the host lists them)", self.app),
                    )
                })?;
                let (from, to) = match choice {
                    Choice::Serving(t) => return Ok(Next::Serving(t)),
                    Choice::Release { from, to } => (from, to),
                };
                let number = to.release.unwrap_or_default();
                Ok(Next::Session {
                    script: format!(
                        "C={c}; N={n}\n\
                         keter status --json -c \"$C\" || exit 3\n\
                         echo '{MARK} before'\n\
                         keter rollback \"$N\" {number} -c \"$C\" 2>&1; s=$?\n\
                         echo \"{MARK} done $s\"; [ $s -eq 0 ] || exit 0\n\
                         {polls}",
                        n = quote(&self.app),
                    ),
                    what: format!(
                        "connected in {}s; rolling back from release {} (sha256 {}) to release {number} (sha256 {})",
                        secs(connected),
                        from.release.unwrap_or_default(),
                        short(&from.sha256),
                        short(&to.sha256)
                    ),
                    target: to,
                })
            }
        }
    }

    /// The end of the second session's script: `keter status --json` every 200 ms, bounded,
    /// and ended by the first write after this side hung up, so nothing is left polling on
    /// the host.
    fn polls(&self) -> String {
        format!(
            "i=0; while [ $i -lt {polls} ]; do i=$((i+1))\n\
             keter status --json -c \"$C\"; echo \"{MARK} status $?\" || exit 0; sleep 0.2; done",
            polls = self.timeout.as_secs() * 5 + 50,
        )
    }
}

/// The second session's script of a deploy (`c`: the host's configuration, quoted): status
/// before, the copy (checked, renamed), then statuses.
fn deploy_script(bundle: &Bundle, c: &str, incoming: &Path, polls: &str) -> String {
    format!(
        "C={c}; D={d}; N={n}; T=\".$N.deploy-$$.part\"\n\
         keter status --json -c \"$C\" || exit 3\n\
         echo '{MARK} before'\n\
         cat > \"$D/$T\" || {{ rm -f -- \"$D/$T\"; exit 4; }}\n\
         if ! echo {sha}'  '\"$D/$T\" | sha256sum -c --status; then\n\
         rm -f -- \"$D/$T\"; echo \"the bundle arrived incomplete or changed (sha256 differs)\" >&2; exit 5\n\
         fi\n\
         mv -f -- \"$D/$T\" \"$D/$N\" || {{ rm -f -- \"$D/$T\"; exit 6; }}\n\
         echo '{MARK} done 0'\n\
         {polls}",
        d = quote(&incoming.to_string_lossy()),
        n = quote(&bundle.file_name),
        sha = quote(&bundle.sha256),
    )
}

/// Where a host's rollback goes, by its own release list.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// From the serving release to this one.
    Release { from: Target, to: Target },
    /// The release asked for is the one serving: nothing to do.
    Serving(Target),
}

/// Chooses a host's rollback from its release list (`keter releases NAME --json`): without
/// `sha256`, the release before the serving one by the rule the host's keter follows
/// ([`Releases::previous`](crate::app::releases::Releases::previous)); with it, the newest
/// release whose bundle's sha256 starts so (a release that was rolled back included: naming
/// it is the operator's explicit act, as `keter rollback NAME N` on one host).
fn choose(list: &Value, sha256: Option<&str>) -> Result<Choice, ChoiceError> {
    use crate::app::releases::{FORMAT, Release, Releases};
    let releases: Vec<Release> = list
        .get("releases")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(ChoiceError::List)?
        .unwrap_or_default();
    let releases = Releases {
        format: FORMAT,
        releases,
        next: 0,
    };
    let target = |r: &Release| Target {
        sha256: r.sha256.clone(),
        release: Some(r.number),
    };
    let Some(current) = releases.current() else {
        return Err(ChoiceError::NoneServing);
    };
    let to = match sha256 {
        None => releases.previous().ok_or(ChoiceError::NoEarlier {
            kept: releases.releases.len(),
        })?,
        Some(prefix) => {
            let mut matching = releases
                .releases
                .iter()
                .rev()
                .filter(|r| r.sha256.starts_with(prefix));
            let Some(newest) = matching.next() else {
                return Err(ChoiceError::NotKept {
                    prefix: prefix.to_string(),
                });
            };
            if let Some(other) = matching.find(|r| r.sha256 != newest.sha256) {
                return Err(ChoiceError::Ambiguous {
                    prefix: prefix.to_string(),
                    one: newest.sha256.clone(),
                    other: other.sha256.clone(),
                });
            }
            if newest.sha256 == current.sha256 {
                return Ok(Choice::Serving(target(current)));
            }
            newest
        }
    };
    Ok(Choice::Release {
        from: target(current),
        to: target(to),
    })
}

/// Why a host's rollback has nowhere to go ([`choose`]).
#[derive(Debug)]
enum ChoiceError {
    /// `keter releases NAME --json` printed no release list keter reads.
    List(serde_json::Error),
    /// No release serves on the host.
    NoneServing,
    /// No release before the serving one may be gone back to; `kept` are kept.
    NoEarlier { kept: usize },
    /// No kept release's sha256 begins with `prefix`.
    NotKept { prefix: String },
    /// `prefix` begins the sha256 of two kept bundles, `one` and `other`.
    Ambiguous {
        prefix: String,
        one: String,
        other: String,
    },
}

impl std::fmt::Display for ChoiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChoiceError::List(e) => write!(f, "the host's release list cannot be read: {e}"),
            ChoiceError::NoneServing => {
                f.write_str("no release serves on this host, so there is none to go back from")
            }
            ChoiceError::NoEarlier { kept } => write!(
                f,
                "there is no earlier release to go back to on this host: none of its {kept} kept \
                 releases before the serving one has another bundle and was not itself rolled \
                 back"
            ),
            ChoiceError::NotKept { prefix } => {
                write!(f, "no release of sha256 {prefix} is kept on this host")
            }
            ChoiceError::Ambiguous { prefix, one, other } => write!(
                f,
                "sha256 {prefix} begins two kept bundles on this host ({} and {}): give more of it",
                short(one),
                short(other)
            ),
        }
    }
}

impl std::error::Error for ChoiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChoiceError::List(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a host's configuration gives no root ([`root_of`]); `config` is its path on the host.
#[derive(Debug)]
enum RootError {
    Yaml {
        config: PathBuf,
        error: crate::yaml::YamlError,
    },
    Missing {
        config: PathBuf,
    },
}

impl std::fmt::Display for RootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootError::Yaml { config, error } => write!(
                f,
                "{} on the host is not valid YAML: {error}",
                config.display()
            ),
            RootError::Missing { config } => write!(
                f,
                "{}: root: missing on the host (or not a string): keter deploy needs it to find incoming/",
                config.display()
            ),
        }
    }
}

impl std::error::Error for RootError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RootError::Yaml { error, .. } => Some(error),
            RootError::Missing { .. } => None,
        }
    }
}

/// The host's root from its configuration text (or the folder mark), relative paths taken
/// from the configuration's folder as keter takes them.
fn root_of(output: &str, config: &Path) -> Result<PathBuf, RootError> {
    if output.trim() == format!("{MARK} folder") {
        return Ok(config.to_path_buf());
    }
    let tree = crate::yaml::parse(output).map_err(|error| RootError::Yaml {
        config: config.to_path_buf(),
        error,
    })?;
    let root = tree
        .get("root")
        .and_then(Value::as_str)
        .ok_or_else(|| RootError::Missing {
            config: config.to_path_buf(),
        })?;
    let base = config.parent().unwrap_or(Path::new("/"));
    Ok(crate::fspath::normalize(&base.join(root)))
}

/// Single-quotes `s` for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// SSH's own error: the last lines it printed, or its exit code.
fn ssh_error(stderr: &str, code: Option<i32>) -> String {
    let text = crate::applog::printable(stderr.trim()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join("; ");
    match (tail.is_empty(), code) {
        (false, _) => tail,
        (true, Some(c)) => format!("exited with code {c} and printed nothing"),
        (true, None) => "killed by a signal".into(),
    }
}

fn progress(rollout: &Rollout, host: &str, what: &str) {
    let line = format!("[{:>6}s] {host}: {what}", secs(rollout.start.elapsed()));
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The summary table, one line per host.
fn table(rollout: &Rollout, reports: &[HostReport]) -> String {
    let width = reports
        .iter()
        .map(|r| r.host.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let step = rollout.step();
    // A rollback says where each host went: the release numbers differ from host to host.
    let rollback = matches!(rollout.work, Work::Rollback { .. });
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<width$}  {:<11}  {:>8}  {:>8}  {:>8}  {:>8}  ",
        "HOST",
        "RESULT",
        "CONNECT",
        step.name().to_uppercase(),
        "WAIT",
        "TOTAL"
    );
    if rollback {
        let _ = write!(out, "{:<20}  ", "RELEASE");
    }
    let _ = writeln!(out, "ERROR");
    for r in reports {
        let took = |s: Step| {
            r.steps
                .iter()
                .find(|(x, _)| *x == s)
                .map(|(_, d)| format!("{}s", secs(*d)))
                .unwrap_or_else(|| "-".into())
        };
        let total = match r.outcome {
            Outcome::NotReached => "-".to_string(),
            _ => format!("{}s", secs(r.finished - r.started)),
        };
        let mut line = format!(
            "{:<width$}  {:<11}  {:>8}  {:>8}  {:>8}  {:>8}  ",
            r.host,
            r.outcome.name(),
            took(Step::Connect),
            took(step),
            took(Step::Wait),
            total,
        );
        if rollback {
            let release = match &r.target {
                Some(t) => format!("{} {}", t.release.unwrap_or_default(), short(&t.sha256)),
                None => "-".into(),
            };
            let _ = write!(line, "{release:<20}  ");
        }
        if let Some(e) = rollout.error_of(&r.outcome) {
            line.push_str(&e);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

fn json_report(rollout: &Rollout, plan: &Plan, reports: &[HostReport], ok: bool) -> Value {
    let ms = |d: Duration| d.as_millis() as u64;
    let step = rollout.step();
    let hosts: Vec<Value> = reports
        .iter()
        .map(|r| {
            let reached = r.outcome != Outcome::NotReached;
            let step_ms = |s: Step| r.steps.iter().find(|(x, _)| *x == s).map(|(_, d)| ms(*d));
            let mut host = json!({
                "host": r.host,
                "result": match r.outcome {
                    Outcome::NotReached => "not-reached",
                    _ => r.outcome.name(),
                },
                "failed_step": match &r.outcome {
                    Outcome::Failed(s, _) => Some(s.name()),
                    Outcome::Unreachable(_) => Some(Step::Connect.name()),
                    _ => None,
                },
                "error": match &r.outcome {
                    Outcome::Failed(_, e) | Outcome::Unreachable(e) => Some(e.as_str()),
                    _ => None,
                },
                "started_ms": reached.then(|| ms(r.started)),
                "finished_ms": reached.then(|| ms(r.finished)),
                "connect_ms": step_ms(Step::Connect),
                format!("{}_ms", step.name()): step_ms(step),
                "wait_ms": step_ms(Step::Wait),
            });
            if let Work::Rollback { .. } = rollout.work {
                host["release"] = json!(r.target.as_ref().and_then(|t| t.release));
                host["sha256"] = json!(r.target.as_ref().map(|t| &t.sha256));
            }
            host
        })
        .collect();
    let mut report = json!({
        "app": rollout.app,
        "result": if ok { "succeeded" } else { "stopped" },
        "parallel": plan.parallel,
        "duration_ms": ms(rollout.start.elapsed()),
        "hosts": hosts,
    });
    match &rollout.work {
        Work::Deploy(b) => {
            report["action"] = json!("deploy");
            report["bundle"] = json!(b.path.display().to_string());
            report["sha256"] = json!(b.sha256);
        }
        Work::Rollback { sha256 } => {
            report["action"] = json!("rollback");
            report["release"] = json!(sha256);
        }
    }
    report
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Option<Plan>, String> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse_deploy(&args)
    }

    #[test]
    fn parses_hosts_and_options() {
        let plan = p("app.keter --hosts web1,root@web2 -H ssh://web3:2222 --parallel 2 --timeout 30 -c /srv/k.yaml --json")
            .unwrap()
            .unwrap();
        assert_eq!(
            plan.action,
            Action::Deploy {
                bundle: PathBuf::from("app.keter")
            }
        );
        assert_eq!(plan.hosts, ["web1", "root@web2", "ssh://web3:2222"]);
        assert_eq!(plan.parallel, 2);
        assert_eq!(plan.timeout, Duration::from_secs(30));
        assert_eq!(plan.config, PathBuf::from("/srv/k.yaml"));
        assert!(plan.json);
        let plan = p("--hosts=web1 app.keter").unwrap().unwrap();
        assert_eq!(plan.parallel, 1);
        assert_eq!(plan.config, PathBuf::from(DEFAULT_CONFIG_PATH));
        assert_eq!(p("--help").unwrap(), None);
    }

    #[test]
    fn refuses_what_would_be_ambiguous() {
        // Hosts are never positional: `keter rollback NAME [RELEASE]` takes the same --hosts.
        assert!(p("app.keter web1 web2").unwrap_err().contains("--hosts"));
        assert!(p("app.keter").unwrap_err().contains("--hosts"));
        assert!(p("--hosts web1").unwrap_err().contains("BUNDLE"));
        assert!(p("app.keter --hosts web1,,web2").is_err());
        assert!(p("app.keter --hosts -oProxyCommand=x").is_err());
        assert!(
            p("app.keter --hosts web1,web1")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(p("app.keter --hosts web1 --parallel 0").is_err());
        assert!(p("app.keter --hosts web1 --timeout -1").is_err());
        assert!(p("app.keter --hosts web1 --nope").is_err());
    }

    #[test]
    fn root_from_the_hosts_configuration() {
        let config = Path::new("/etc/keter/keter-config.yaml");
        assert_eq!(
            root_of("root: /opt/keter\nlisteners: 80\n", config).unwrap(),
            PathBuf::from("/opt/keter")
        );
        assert_eq!(
            root_of("root: ../srv/./keter\n", config).unwrap(),
            PathBuf::from("/etc/srv/keter")
        );
        assert_eq!(
            root_of(&format!("{MARK} folder\n"), Path::new("/srv/k")).unwrap(),
            PathBuf::from("/srv/k")
        );
        assert!(
            root_of("listeners: 80\n", config)
                .unwrap_err()
                .to_string()
                .contains("root")
        );
        assert!(root_of("root: [\n", config).is_err());
    }

    #[test]
    fn quotes_for_the_remote_shell() {
        assert_eq!(quote("/opt/ke'ter"), r"'/opt/ke'\''ter'");
        assert_eq!(quote("a b$c"), "'a b$c'");
    }

    fn release(number: u64, sha: &str, ended: Option<&str>) -> Value {
        json!({"number": number, "sha256": sha.repeat(32), "size": 10,
               "deployed_at": "2026-12-07T10:00:00Z", "deployed_by": 0,
               "ended": ended})
    }

    fn to(choice: Result<Choice, ChoiceError>) -> (Option<u64>, Option<u64>) {
        match choice {
            Ok(Choice::Release { from, to }) => (from.release, to.release),
            Ok(Choice::Serving(t)) => (t.release, None),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_host_goes_back_by_its_own_list() {
        // Releases 1 (aa), 2 (bb), 3 (cc) serving: back to 2, as the host's keter goes.
        let list = json!({"releases": [
            release(1, "aa", Some("replaced")),
            release(2, "bb", Some("replaced")),
            release(3, "cc", None),
        ]});
        assert_eq!(to(choose(&list, None)), (Some(3), Some(2)));
        // By sha256 prefix: any kept release, the newest of that bundle.
        assert_eq!(to(choose(&list, Some("aaaaaaaa"))), (Some(3), Some(1)));
        // The bundle that serves already: nothing to do.
        assert_eq!(to(choose(&list, Some("cccccccc"))), (Some(3), None));
        assert!(
            choose(&list, Some("dddddddd"))
                .unwrap_err()
                .to_string()
                .contains("no release of sha256 dddddddd")
        );
        // 2 was rolled back to 1 (now release 3): nothing earlier to go back to, but 2 may
        // still be named.
        let list = json!({"releases": [
            release(1, "aa", Some("replaced")),
            release(2, "bb", Some("rolled-back")),
            release(3, "aa", None),
        ]});
        assert!(
            choose(&list, None)
                .unwrap_err()
                .to_string()
                .contains("no earlier release")
        );
        assert_eq!(to(choose(&list, Some("bbbbbbbb"))), (Some(3), Some(2)));
        // A first release only, or nothing serving.
        let list = json!({"releases": [release(1, "aa", None)]});
        assert!(
            choose(&list, None)
                .unwrap_err()
                .to_string()
                .contains("no earlier release")
        );
        let list = json!({"releases": []});
        assert!(
            choose(&list, None)
                .unwrap_err()
                .to_string()
                .contains("no release serves")
        );
        // A prefix of two bundles is refused.
        let list = json!({"releases": [
            release(1, "ab", Some("replaced")),
            release(2, "ac", Some("replaced")),
            release(3, "cc", None),
        ]});
        assert!(
            choose(&list, Some("a"))
                .unwrap_err()
                .to_string()
                .contains("give more")
        );
        assert!(choose(&json!({"releases": 3}), None).is_err());
    }

    #[test]
    fn across_hosts_release_is_a_sha256() {
        assert_eq!(sha256_prefix("1A2B3C4D").unwrap(), "1a2b3c4d");
        assert_eq!(sha256_prefix(&"f".repeat(64)).unwrap(), "f".repeat(64));
        for wrong in ["3", "1234567", "1a2b3c4g", &"f".repeat(65)] {
            assert!(sha256_prefix(wrong).is_err(), "{wrong}");
        }
    }

    fn app(state: &str, sha: Option<&str>, last: Value) -> Value {
        json!({"name": "shop", "state": state, "sha256": sha, "last_deploy": last,
               "deploy_stage": null, "last_error": null})
    }

    #[test]
    fn verdict_of_a_status() {
        let new = "aa".repeat(32);
        let old = "bb".repeat(32);
        let ok_before = json!({"result": "succeeded", "finished": "2026-01-01T00:00:00Z"});
        let before = app("running", Some(&old), ok_before.clone());
        assert!(matches!(verdict(None, None, &new), Verdict::Waiting(_)));
        assert!(matches!(
            verdict(Some(&before), Some(&before), &new),
            Verdict::Waiting(_)
        ));
        let serving = app(
            "running",
            Some(&new),
            json!({"result": "succeeded", "finished": "x"}),
        );
        assert_eq!(
            verdict(Some(&serving), Some(&before), &new),
            Verdict::Serving
        );
        let failed = app(
            "running",
            Some(&old),
            json!({"result": "failed", "finished": "y", "error": "never ready", "error_kind": "readiness"}),
        );
        match verdict(Some(&failed), Some(&before), &new) {
            Verdict::Failed(e) => {
                assert!(e.contains("never ready") && e.contains("readiness"), "{e}")
            }
            v => panic!("{v:?}"),
        }
        // A failure from before the copy is not this bundle's.
        assert!(matches!(
            verdict(Some(&failed), Some(&failed), &new),
            Verdict::Waiting(_)
        ));
        let looping = app("crash-looping", Some(&new), ok_before);
        assert!(matches!(
            verdict(Some(&looping), Some(&before), &new),
            Verdict::Failed(_)
        ));
    }
}
