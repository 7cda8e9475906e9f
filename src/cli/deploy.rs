//! `keter deploy BUNDLE --hosts HOST[,HOST...]`: one bundle rolled out to several keter hosts
//! over the system's OpenSSH client (README "Several hosts").
//!
//! keter stays a per-host agent: this command only does what an operator would do by hand on
//! each host, in turn, with their own keys and `~/.ssh/config`. Per host, two SSH sessions:
//!
//! 1. **connect**: read the host's keter configuration (`-c`, the package's by default) to
//!    learn its root, hence its `incoming/`;
//! 2. **copy** and **wait**: read the app's status before anything changes, receive the bundle
//!    on stdin under a name keter's daemon ignores (a leading dot, not ending in `.keter`: see
//!    `reconcile` in `src/daemon.rs`), check its sha256, rename it to `NAME.keter` in the same
//!    folder (so the daemon never sees a half-written bundle), then print `keter status
//!    --json` every 200 ms until this side has its answer: the bundle's sha256 serving, or
//!    the host's deploy failed, or the timeout.
//!
//! The first host that fails stops the rollout: no host is started after it, and the hosts not
//! reached keep what they serve. The bundle is checked here first (`keter check`'s reading,
//! see [`super::commands::check_for_hosts`]), before anything is copied.

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

/// How long a host's keter has, from the rename into `incoming/`, to report the bundle serving.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The environment variable naming the SSH command (program and its own arguments, split on
/// whitespace), as `GIT_SSH_COMMAND` does for git; `ssh` when unset.
pub const SSH_COMMAND_VAR: &str = "KETER_SSH_COMMAND";

/// Exit code when a host failed and the rollout stopped (1: the bundle failed the local check).
pub const EXIT_STOPPED: u8 = 3;

/// Marks the lines of the remote script's own output, between what `cat` and `keter status`
/// print.
const MARK: &str = "@@keter-deploy";

/// `keter deploy`, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub bundle: PathBuf,
    pub hosts: Vec<String>,
    pub parallel: usize,
    pub timeout: Duration,
    /// The keter configuration on the hosts.
    pub config: PathBuf,
    pub json: bool,
}

/// Parses the arguments after `deploy`: `Ok(None)` asks for the help text.
pub fn parse(args: &[String]) -> Result<Option<Plan>, String> {
    let mut bundle: Vec<&String> = Vec::new();
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
                    hosts.push(check_host(host)?);
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
            _ => bundle.push(a),
        }
    }
    let bundle = match bundle.as_slice() {
        [b] => PathBuf::from(b),
        [] => return Err("keter deploy needs a BUNDLE (NAME.keter)".into()),
        more => {
            return Err(format!(
                "keter deploy takes one BUNDLE, and hosts with --hosts: {} are not options",
                more.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    };
    if hosts.is_empty() {
        return Err("keter deploy needs --hosts HOST[,HOST...]".into());
    }
    if let Some(h) = hosts
        .iter()
        .enumerate()
        .find(|(i, h)| hosts[..*i].contains(h))
    {
        return Err(format!("--hosts names {} twice", h.1));
    }
    Ok(Some(Plan {
        bundle,
        hosts,
        parallel,
        timeout,
        config,
        json,
    }))
}

/// A host as `ssh` takes it: `[USER@]HOST`, an alias of `~/.ssh/config`, or
/// `ssh://[USER@]HOST[:PORT]`. Never an option, never blank.
fn check_host(host: &str) -> Result<String, String> {
    let host = host.trim();
    if host.is_empty() {
        return Err("--hosts has an empty host name".into());
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "--hosts: {:?} is not a host: it starts with '-' or holds a space or a control character",
            host
        ));
    }
    Ok(host.to_string())
}

/// The step a host is at, or failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connect,
    Copy,
    Wait,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Copy => "copy",
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

#[derive(Debug, Clone)]
struct HostReport {
    host: String,
    outcome: Outcome,
    started: Duration,
    finished: Duration,
    /// Time spent in each step that ran.
    steps: Vec<(Step, Duration)>,
}

/// What every host's run shares.
struct Rollout<'a> {
    ssh: Vec<String>,
    bundle: &'a Path,
    file_name: String,
    app: String,
    sha256: String,
    size: u64,
    config: &'a Path,
    timeout: Duration,
    start: Instant,
}

/// Runs `keter deploy`.
pub fn run(plan: &Plan) -> ExitCode {
    let start = Instant::now();
    let (app, sha256, warnings) = match commands::check_for_hosts(&plan.bundle) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "keter: {}: not deployed: the bundle has errors (nothing was copied)",
                plan.bundle.display()
            );
            return ExitCode::from(1);
        }
    };
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let size = std::fs::metadata(&plan.bundle)
        .map(|m| m.len())
        .unwrap_or(0);
    let ssh = match ssh_command() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keter: {e}");
            return ExitCode::from(1);
        }
    };
    let rollout = Rollout {
        ssh,
        bundle: &plan.bundle,
        file_name: format!("{app}.keter"),
        app: app.to_string(),
        sha256,
        size,
        config: &plan.config,
        timeout: plan.timeout,
        start,
    };
    eprintln!(
        "keter: deploying {} (sha256 {}, {}) to {} host{}, {} at a time",
        plan.bundle.display(),
        short(&rollout.sha256),
        mib(size),
        plan.hosts.len(),
        if plan.hosts.len() == 1 { "" } else { "s" },
        plan.parallel.min(plan.hosts.len())
    );
    let reports = roll(&rollout, &plan.hosts, plan.parallel);
    let ok = reports.iter().all(|r| r.outcome == Outcome::Serving);
    if plan.json {
        println!("{}", json_report(&rollout, plan, &reports, ok));
    } else {
        print!("{}", table(&reports));
        if !ok {
            let failed = reports
                .iter()
                .find(|r| matches!(r.outcome, Outcome::Failed(..) | Outcome::Unreachable(_)));
            if let Some(f) = failed {
                eprintln!(
                    "keter: the rollout stopped at {}: {}",
                    f.host,
                    error_of(&f.outcome).unwrap_or_default()
                );
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_STOPPED)
    }
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
                    let report = deploy_host(rollout, host);
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
            })
        })
        .collect()
}

/// One host: connect, copy, wait. Prints a progress line at each step.
fn deploy_host(rollout: &Rollout, host: &str) -> HostReport {
    let started = rollout.start.elapsed();
    let mut steps = Vec::new();
    let outcome = host_steps(rollout, host, &mut steps);
    let finished = rollout.start.elapsed();
    let took = finished - started;
    match &outcome {
        Outcome::Serving => progress(
            rollout,
            host,
            &format!(
                "serving sha256 {} ({}s on this host)",
                short(&rollout.sha256),
                secs(took)
            ),
        ),
        other => progress(
            rollout,
            host,
            &format!(
                "{} ({}s on this host)",
                error_of(other).unwrap_or_default(),
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
    }
}

fn host_steps(rollout: &Rollout, host: &str, steps: &mut Vec<(Step, Duration)>) -> Outcome {
    // 1. connect: the host's root.
    let t = Instant::now();
    progress(rollout, host, "connecting");
    let script = config_script(rollout.config);
    let out = match rollout.command(host, &script).stdin(Stdio::null()).output() {
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
        return Outcome::Failed(
            Step::Connect,
            format!(
                "cannot read {} on the host: {}",
                rollout.config.display(),
                ssh_error(&stderr, out.status.code())
            ),
        );
    }
    let root = match root_of(&String::from_utf8_lossy(&out.stdout), rollout.config) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(Step::Connect, e),
    };
    let incoming = root.join("incoming");
    progress(
        rollout,
        host,
        &format!(
            "connected in {}s; copying {} into {}",
            secs(t.elapsed()),
            mib(rollout.size),
            incoming.display()
        ),
    );

    // 2. copy, then wait, in one session.
    let t = Instant::now();
    let script = deploy_script(rollout, &incoming);
    let mut child = match rollout
        .command(host, &script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed(Step::Copy, format!("cannot run {}: {e}", rollout.ssh[0]));
        }
    };
    let session = Session::start(&mut child, rollout.bundle);
    let outcome = follow(rollout, host, &session, t, steps);
    let _ = child.kill();
    let status = child.wait().ok();
    let outcome = match outcome {
        Followed::Done(o) => o,
        Followed::Ended(step) => {
            let code = status.and_then(|s| s.code());
            let stderr = session.finish();
            if code == Some(255) && step == Step::Copy {
                Outcome::Unreachable(ssh_error(&stderr, code))
            } else {
                Outcome::Failed(step, ssh_error(&stderr, code))
            }
        }
    };
    if steps.last().is_none_or(|(s, _)| *s == Step::Connect) {
        steps.push((Step::Copy, t.elapsed()));
    }
    outcome
}

/// How following the second session ended.
enum Followed {
    Done(Outcome),
    /// The session ended (or failed) during this step, before an answer.
    Ended(Step),
}

/// Reads the second session's output: the status before, the copy's end, then statuses.
fn follow(
    rollout: &Rollout,
    host: &str,
    session: &Session,
    t: Instant,
    steps: &mut Vec<(Step, Duration)>,
) -> Followed {
    let copy_deadline = t + rollout.timeout.max(Duration::from_secs(600));
    let mut block = String::new();
    let mut before: Option<Value> = None;
    let mut copied_at: Option<Instant> = None;
    let mut last_seen = String::from("no status read yet");
    loop {
        let deadline = match copied_at {
            Some(c) => c + rollout.timeout,
            None => copy_deadline,
        };
        let line = match session
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Some(l)) => l,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Followed::Ended(if copied_at.is_some() {
                    Step::Wait
                } else {
                    Step::Copy
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Followed::Done(match copied_at {
                    Some(_) => Outcome::Failed(
                        Step::Wait,
                        format!(
                            "the host's keter did not report sha256 {} serving within {}s; it reports {last_seen}",
                            short(&rollout.sha256),
                            secs(rollout.timeout)
                        ),
                    ),
                    None => Outcome::Failed(
                        Step::Copy,
                        format!(
                            "the copy did not finish within {}s",
                            secs(copy_deadline - t)
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
        match mark.trim() {
            "before" => {
                before = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| app_of(&v, &rollout.app).cloned());
            }
            "copied" => {
                let took = t.elapsed();
                steps.push((Step::Copy, took));
                copied_at = Some(Instant::now());
                progress(
                    rollout,
                    host,
                    &format!("copied in {}s; waiting for keter to serve it", secs(took)),
                );
            }
            m if m.starts_with("status") => {
                let Some(copied) = copied_at else { continue };
                let verdict = match serde_json::from_str::<Value>(&text) {
                    Ok(v) => verdict(app_of(&v, &rollout.app), before.as_ref(), &rollout.sha256),
                    Err(_) => Verdict::Waiting(format!(
                        "no status (`keter status` said: {})",
                        crate::applog::printable(session.stderr().trim())
                    )),
                };
                match verdict {
                    Verdict::Waiting(seen) => last_seen = seen,
                    Verdict::Serving => {
                        steps.push((Step::Wait, copied.elapsed()));
                        return Followed::Done(Outcome::Serving);
                    }
                    Verdict::Failed(e) => {
                        steps.push((Step::Wait, copied.elapsed()));
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
    fn start(child: &mut Child, bundle: &Path) -> Session {
        if let Some(mut stdin) = child.stdin.take() {
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

/// The first session's script: prints the configuration file, or says that it is a root
/// folder (keter takes both).
fn config_script(config: &Path) -> String {
    format!(
        "C={}; if [ -d \"$C\" ]; then echo '{MARK} folder'; else cat -- \"$C\"; fi",
        quote(&config.to_string_lossy())
    )
}

/// The second session's script: status before, the copy (checked, renamed), then statuses.
fn deploy_script(rollout: &Rollout, incoming: &Path) -> String {
    let incoming = incoming.to_string_lossy();
    let name = &rollout.file_name;
    format!(
        "C={c}; D={d}; N={n}; T=\".$N.deploy-$$.part\"\n\
         keter status --json -c \"$C\" || exit 3\n\
         echo '{MARK} before'\n\
         cat > \"$D/$T\" || {{ rm -f -- \"$D/$T\"; exit 4; }}\n\
         if ! echo {sha}'  '\"$D/$T\" | sha256sum -c --status; then\n\
         rm -f -- \"$D/$T\"; echo \"the bundle arrived incomplete or changed (sha256 differs)\" >&2; exit 5\n\
         fi\n\
         mv -f -- \"$D/$T\" \"$D/$N\" || {{ rm -f -- \"$D/$T\"; exit 6; }}\n\
         echo '{MARK} copied'\n\
         i=0; while [ $i -lt {polls} ]; do i=$((i+1))\n\
         keter status --json -c \"$C\"; echo \"{MARK} status $?\" || exit 0; sleep 0.2; done",
        // Bounded, and ended by the first write after this side hung up: nothing is left
        // polling on the host.
        polls = rollout.timeout.as_secs() * 5 + 50,
        c = quote(&rollout.config.to_string_lossy()),
        d = quote(&incoming),
        n = quote(name),
        sha = quote(&rollout.sha256),
    )
}

/// The host's root from its configuration text (or the folder mark), relative paths taken
/// from the configuration's folder as keter takes them.
fn root_of(output: &str, config: &Path) -> Result<PathBuf, String> {
    if output.trim() == format!("{MARK} folder") {
        return Ok(config.to_path_buf());
    }
    let tree = crate::yaml::parse(output)
        .map_err(|e| format!("{} on the host is not valid YAML: {e}", config.display()))?;
    let root = tree.get("root").and_then(Value::as_str).ok_or_else(|| {
        format!(
            "{}: root: missing on the host (or not a string): keter deploy needs it to find incoming/",
            config.display()
        )
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

fn error_of(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Unreachable(e) => Some(format!("unreachable: {e}")),
        Outcome::Failed(step, e) => Some(format!("{} failed: {e}", step.name())),
        Outcome::NotReached => Some("not reached: the rollout stopped before this host".into()),
        Outcome::Serving => None,
    }
}

fn progress(rollout: &Rollout, host: &str, what: &str) {
    let line = format!("[{:>6}s] {host}: {what}", secs(rollout.start.elapsed()));
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The summary table, one line per host.
fn table(reports: &[HostReport]) -> String {
    let width = reports
        .iter()
        .map(|r| r.host.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:<11}  {:>8}  {:>8}  {:>8}  {:>8}  ERROR",
        "HOST", "RESULT", "CONNECT", "COPY", "WAIT", "TOTAL"
    );
    for r in reports {
        let step = |s: Step| {
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
        let _ = writeln!(
            out,
            "{:<width$}  {:<11}  {:>8}  {:>8}  {:>8}  {:>8}  {}",
            r.host,
            r.outcome.name(),
            step(Step::Connect),
            step(Step::Copy),
            step(Step::Wait),
            total,
            match &r.outcome {
                Outcome::Serving => String::new(),
                o => error_of(o).unwrap_or_default(),
            }
        );
    }
    out
}

fn json_report(rollout: &Rollout, plan: &Plan, reports: &[HostReport], ok: bool) -> Value {
    let ms = |d: Duration| d.as_millis() as u64;
    let hosts: Vec<Value> = reports
        .iter()
        .map(|r| {
            let reached = r.outcome != Outcome::NotReached;
            let step_ms = |s: Step| r.steps.iter().find(|(x, _)| *x == s).map(|(_, d)| ms(*d));
            json!({
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
                "copy_ms": step_ms(Step::Copy),
                "wait_ms": step_ms(Step::Wait),
            })
        })
        .collect();
    json!({
        "bundle": plan.bundle.display().to_string(),
        "app": rollout.app,
        "sha256": rollout.sha256,
        "result": if ok { "succeeded" } else { "stopped" },
        "parallel": plan.parallel,
        "duration_ms": ms(rollout.start.elapsed()),
        "hosts": hosts,
    })
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
        parse(&args)
    }

    #[test]
    fn parses_hosts_and_options() {
        let plan = p("app.keter --hosts web1,root@web2 -H ssh://web3:2222 --parallel 2 --timeout 30 -c /srv/k.yaml --json")
            .unwrap()
            .unwrap();
        assert_eq!(plan.bundle, PathBuf::from("app.keter"));
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
                .contains("root")
        );
        assert!(root_of("root: [\n", config).is_err());
    }

    #[test]
    fn quotes_for_the_remote_shell() {
        assert_eq!(quote("/opt/ke'ter"), r"'/opt/ke'\''ter'");
        assert_eq!(quote("a b$c"), "'a b$c'");
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
