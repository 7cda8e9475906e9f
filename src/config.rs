//! The global configuration (`keter-config.yaml`): read in two stages, the YAML tree and then
//! validated values with defaults applied. The README's "Global configuration" lists the keys.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

pub use crate::listen::{Bind, Listener, TlsFiles};
use crate::names::{UrlPath, check_env_name, check_env_value};
use crate::postgres::{PostgresAdmin, Secret, Server};
use crate::problem::{Invalid, Problem, Problems};
use crate::process::RunAs;
use crate::responses::ResponseFiles;
use crate::status::StatusAddress;
use crate::yaml::{self, Fields};

/// Where the daemon looks when `keter run` is given no path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keter/keter-config.yaml";

/// Releases whose bundle is kept for each app, by default: enough to go back a few deploys,
/// at five bundles' disk per app.
pub const DEFAULT_KEEP_RELEASES: usize = 5;

/// The validated global configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute folder holding `incoming/ temp/ log/ etc/ nginx/`.
    pub root: PathBuf,
    /// At least one; each renders into Nginx `listen` lines.
    pub listeners: Vec<Listener>,
    /// Variables given to every app (lowest precedence after the base environment).
    pub env: BTreeMap<String, String>,
    pub external_http_port: u16,
    pub external_https_port: u16,
    /// Per-request bound for proxied requests; `None` means no bound.
    pub connection_time_bound: Option<Duration>,
    /// A path every host answers with 200 from Nginx itself.
    pub healthcheck_path: Option<UrlPath>,
    pub rotate_logs: bool,
    /// An app log file is rotated when it reaches this size...
    pub log_rotate_bytes: u64,
    /// ...keeping this many older files (`app-NAME.log.1` newest).
    pub log_rotate_keep: u32,
    pub ip_from_header: bool,
    /// `request-metrics`: Nginx logs a line per request into keter's request log (README,
    /// "Request metrics"); `false` keeps `access_log off` everywhere.
    pub request_metrics: bool,
    /// The user every app runs as (`setuid`), resolved at load time; never root (that is
    /// `run_apps_as_root`).
    pub run_as: Option<RunAs>,
    /// `run-apps-as-root: true`: a keter running as root runs apps as root too, as Keter did,
    /// instead of one system user per app (README "Security").
    pub run_apps_as_root: bool,
    /// The uids (and gids) of the per-app system users keter creates.
    pub app_uid_range: RangeInclusive<u32>,
    pub nginx: NginxConfig,
    pub readiness_timeout: Duration,
    pub drain_time: Duration,
    pub stop_timeout: Duration,
    /// The health checks of serving webapps (README "Supervision", "Health while serving"):
    /// the defaults of the stanzas that do not set their own.
    pub health: HealthChecks,
    /// Ports handed to apps; never empty.
    pub port_range: RangeInclusive<u16>,
    pub limits: BundleLimits,
    /// The global `memory-limit`, `cpu-limit` and `tasks-limit`: every process stanza's
    /// unless it says otherwise (README "Limits and accounting").
    pub process_limits: crate::cgroup::Limits,
    /// `cgroup`: keter's subtree of the cgroup tree (an absolute path in it); `None` for the
    /// cgroup keter was started in (`src/cgroup.rs`).
    pub cgroup: Option<String>,
    /// The folder served at `/.well-known/acme-challenge/` on every plain HTTP host, for
    /// certbot's webroot mode.
    pub acme_webroot: PathBuf,
    /// The CA that certificates are obtained from over ACME (the `acme` section); `None` when
    /// the section is absent.
    pub acme: Option<crate::acme::AcmeConfig>,
    /// The admin connection of the postgres plugin; `None` when the section is absent (then a
    /// bundle that asks for a database fails its deploy).
    pub postgres: Option<PostgresAdmin>,
    /// Where the status web interface listens; `None` when it is disabled (`status: false`).
    pub status: Option<StatusAddress>,
    /// Folders outside bundles that a static-files stanza may serve (`allowed-static-roots`;
    /// absolute, symlinks resolved). None by default.
    pub allowed_static_roots: Vec<PathBuf>,
    /// Nginx's `client_max_body_size` for every app (`client-max-body-size`); 0, the default,
    /// is no limit, as Keter has none.
    pub client_max_body_size: u64,
    /// How many releases of each app keep their bundle under `ROOT/releases/` (README
    /// "Releases and rollback").
    pub keep_releases: usize,
    /// When a release is rolled back by itself (README "Releases and rollback", "Automatic
    /// rollback"): `rollback-window` (a bundle's own key overrides it) and the thresholds of
    /// its users' errors.
    pub rollback: AutoRollback,
    /// Keter's `*-response-file` pages.
    pub responses: ResponseFiles,
}

/// How often a serving webapp's health check runs, how many failures in a row make it
/// unhealthy, and how long one check may take (`health-check-interval`,
/// `health-check-failures`, `health-check-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthChecks {
    /// Zero: no checks.
    pub interval: Duration,
    pub failures: u32,
    pub timeout: Duration,
}

impl Default for HealthChecks {
    /// Every 10 s, 3 failures, 5 s each: a Warp or Rails app answers a health check in
    /// milliseconds, so one check every 10 s costs it nothing, and a hung app is replaced
    /// within about 45 s (three checks 15 s apart: README "Measured").
    fn default() -> HealthChecks {
        HealthChecks {
            interval: Duration::from_secs(10),
            failures: 3,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Automatic rollback (README "Releases and rollback"): how long after its switch a release
/// is watched (`rollback-window`; zero: not at all), and when its share of failed requests
/// counts as clearly worse than its predecessor's (`rollback-min-requests`,
/// `rollback-error-ratio`, `rollback-error-factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRollback {
    pub window: Duration,
    pub min_requests: u64,
    pub error_ratio: f64,
    pub error_factor: f64,
}

impl Default for AutoRollback {
    /// Five minutes: a release that crashes or fails its users does so in its first minutes
    /// under real traffic, and a later failure is an operator's to judge. 100 requests, at
    /// least 5 % of them failed and at least twice the predecessor's share: a handful of
    /// errors on a quiet app, or an app that always fails a few per cent, rolls nothing back.
    fn default() -> AutoRollback {
        AutoRollback {
            window: Duration::from_secs(300),
            min_requests: 100,
            error_ratio: 0.05,
            error_factor: 2.0,
        }
    }
}

/// How keter runs and reaches Nginx.
#[derive(Debug, Clone)]
pub struct NginxConfig {
    pub mode: NginxMode,
    /// The `nginx` executable (looked up on PATH when relative).
    pub binary: PathBuf,
    /// System mode: the pid file of the master to signal.
    pub pid_file: PathBuf,
    /// How long to wait for Nginx to confirm a new configuration after SIGHUP.
    pub reload_timeout: Duration,
    /// Managed mode run by root: the user Nginx's workers run as (`nginx.user`); `None` for
    /// the default (`www-data` where it exists, else `nobody`).
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NginxMode {
    /// keter runs its own Nginx master as a child process.
    Managed,
    /// Nginx is an OS service; keter writes files under its root and signals the master.
    System,
}

/// Caps applied while unpacking a bundle.
#[derive(Debug, Clone, Copy)]
pub struct BundleLimits {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub max_depth: usize,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            max_bytes: 4 << 30,
            max_entries: 100_000,
            max_depth: 64,
        }
    }
}

impl Config {
    /// Loads the daemon's configuration: `path` is a YAML file, or a root folder (defaults).
    /// Warnings (unknown keys) are logged; errors are returned, all of them.
    pub fn load(path: &Path) -> Result<Config, Invalid> {
        let (config, problems) = Config::check(path);
        for w in &problems.warnings {
            log::warn!("{w}");
        }
        match config {
            Some(c) if !problems.has_errors() => Ok(c),
            _ => Err(Invalid(problems.errors)),
        }
    }

    /// Reads configuration text (relative paths taken from `base`); for tests and tools.
    pub fn parse(text: &str, base: &Path, label: &str) -> (Option<Config>, Problems) {
        let mut problems = Problems::new(label);
        match yaml::parse(text) {
            Ok(tree) => {
                let config = from_tree(&tree, None, base, &mut problems);
                (config, problems)
            }
            Err(e) => {
                problems.error("", format!("invalid YAML: {e}"));
                (None, problems)
            }
        }
    }

    /// Reads and validates without logging: every problem is returned.
    pub fn check(path: &Path) -> (Option<Config>, Problems) {
        let mut problems = Problems::new(path.display().to_string());
        if path.is_dir() {
            let root = absolute(path);
            let tree = Value::Object(Default::default());
            let config = from_tree(&tree, Some(root), Path::new("/"), &mut problems);
            return (config, problems);
        }
        let Some(tree) = yaml::read_file(path, &mut problems) else {
            return (None, problems);
        };
        let base = absolute(path.parent().unwrap_or(Path::new(".")));
        let config = from_tree(&tree, None, &base, &mut problems);
        (config, problems)
    }
}

fn absolute(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() {
        Path::new(".")
    } else {
        p
    };
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Builds a `Config` from a parsed tree. `root` overrides the `root` key (folder form);
/// relative paths are taken from `base`.
fn from_tree(
    tree: &Value,
    root: Option<PathBuf>,
    base: &Path,
    problems: &mut Problems,
) -> Option<Config> {
    let mut f = Fields::new(tree, "", problems)?;
    let root = match root {
        Some(r) => Some(r),
        None => match f.string("root", problems) {
            Some(r) => Some(normalize(&base.join(r))),
            None => {
                problems.error(
                    "root",
                    "required: the folder holding incoming/, temp/, log/, etc/ and nginx/",
                );
                None
            }
        },
    };
    let listeners = crate::listen::read_listeners(&mut f, base, problems);
    let mut env = f.string_map("env", problems).unwrap_or_default();
    env.retain(|k, v| {
        let checked = check_env_name(k).and_then(|()| check_env_value(v));
        if let Err(e) = &checked {
            problems.error(format!("env.{k}"), e.clone());
        }
        checked.is_ok()
    });
    let external_http_port = port_or(&mut f, "external-http-port", 80, problems);
    let external_https_port = port_or(&mut f, "external-https-port", 443, problems);
    let connection_time_bound = match f.uint("connection-time-bound", u64::MAX, problems) {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => Some(Duration::from_millis(300_000)),
    };
    let healthcheck_path = f
        .string("healthcheck-path", problems)
        .and_then(|p| match UrlPath::new(&p) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.error("healthcheck-path", e);
                None
            }
        });
    let rotate_logs = f.bool("rotate-logs", problems).unwrap_or(true);
    let ip_from_header = f.bool("ip-from-header", problems).unwrap_or(false);
    let request_metrics = f.bool("request-metrics", problems).unwrap_or(true);
    keter_only_keys(&mut f, &mut env, problems);
    let run_as = f.string("setuid", problems).and_then(|user| {
        RunAs::lookup(&user)
            .map_err(|e| problems.error("setuid", e))
            .ok()
    });
    let run_apps_as_root = f.bool("run-apps-as-root", problems).unwrap_or(false);
    match &run_as {
        Some(_) if run_apps_as_root => problems.error(
            "run-apps-as-root",
            "contradicts setuid: say which user apps run as, or that they run as root, not both",
        ),
        Some(user) if user.uid == 0 => problems.error(
            "setuid",
            format!(
                "{} is root: to run apps as root, remove setuid and say run-apps-as-root: true",
                user.name
            ),
        ),
        _ => {}
    }
    let app_uid_range = read_uid_range(&mut f, problems);
    let log_rotate_bytes = f
        .uint("log-rotate-bytes", u64::MAX, problems)
        .unwrap_or(5 * 1024 * 1024);
    let log_rotate_keep = f
        .uint("log-rotate-keep", 1000, problems)
        .map(|n| n as u32)
        .unwrap_or(20);
    let postgres = read_postgres(&mut f, base, problems);
    let status = crate::status::address::read(f.raw("status"), base, problems);
    let nginx = read_nginx(&mut f, base, problems);
    let system = nginx.as_ref().is_some_and(|n| n.mode == NginxMode::System);
    let responses = crate::responses::read(&mut f, base, system, problems);
    let readiness_timeout = seconds_or(&mut f, "readiness-timeout", 90.0, problems);
    let drain_time = read_drain_time(&mut f, problems);
    let allowed_static_roots = read_allowed_static_roots(&mut f, base, problems);
    let client_max_body_size = f.size("client-max-body-size", problems).unwrap_or(0);
    let keep_releases = match f.uint("keep-releases", 1000, problems) {
        Some(0) => {
            problems.error(
                "keep-releases",
                "0 keeps no release, not even the serving one: at least 1",
            );
            DEFAULT_KEEP_RELEASES
        }
        Some(n) => n as usize,
        None => DEFAULT_KEEP_RELEASES,
    };
    let stop_timeout = seconds_or(&mut f, "stop-timeout", 10.0, problems);
    let health = read_health(&mut f, problems);
    let rollback = read_rollback(&mut f, problems);
    let port_range = read_port_range(&mut f, problems);
    let limits = read_limits(&mut f, problems);
    let process_limits = crate::cgroup::read_limits(&mut f, problems);
    let cgroup = f.string("cgroup", problems).filter(|c| {
        let fine = c.starts_with('/')
            && !c.contains('\0')
            && c.split('/').all(|part| part != ".." && part != ".");
        if !fine {
            problems.error(
                "cgroup",
                format!("expected an absolute path in the cgroup tree such as /keter, found {c:?}"),
            );
        }
        fine
    });
    let acme_webroot = f
        .string("acme-webroot", problems)
        .map(|p| normalize(&base.join(p)));
    let acme = crate::acme::config::read(f.raw("acme"), base, problems);
    f.finish(problems);
    let root = root?;
    let acme_webroot = acme_webroot.unwrap_or_else(|| root.join("acme"));

    Some(Config {
        acme_webroot,
        acme,
        root,
        listeners: listeners?,
        env,
        external_http_port,
        external_https_port,
        connection_time_bound,
        healthcheck_path,
        rotate_logs,
        log_rotate_bytes,
        log_rotate_keep,
        ip_from_header,
        request_metrics,
        run_as,
        run_apps_as_root,
        app_uid_range,
        nginx: nginx?,
        readiness_timeout,
        drain_time,
        stop_timeout,
        health,
        port_range: port_range?,
        limits,
        process_limits,
        cgroup,
        postgres,
        status,
        allowed_static_roots,
        client_max_body_size,
        keep_releases,
        rollback,
        responses,
    })
}

/// Keter's keys that keter gives another meaning or a replacement, each said in a warning
/// rather than called unknown; and the global `env`'s port variables, which keter sets.
fn keter_only_keys(f: &mut Fields, env: &mut BTreeMap<String, String>, problems: &mut Problems) {
    for name in crate::bundle::config::PORT_ENV {
        if env.remove(name).is_some() {
            problems.error(
                format!("env.{name}"),
                crate::bundle::config::port_reserved(name),
            );
        }
    }
    if f.raw("cli-port").is_some() {
        problems.warn(
            "cli-port",
            "Keter's debug console is not there: `keter status` and the status web interface (key `status`) list the apps and their state",
        );
    }
    if f.raw("app-crash-hook").is_some() {
        problems.warn(
            "app-crash-hook",
            "Keter runs no crash hook (Keter 2.3 reads this key as its healthcheck-path by mistake), and keter runs none: crashes are logged, shown by `keter status` and counted in /metrics (keter_app_restarts_total)",
        );
    }
    if f.raw("port-manager").is_some() {
        problems.warn(
            "port-manager",
            "Keter ignores the contents of this key, and so does keter: `port-range` sets the ports given to apps",
        );
    }
    if f.raw("reverse-proxy").is_some() {
        problems.error(
            "reverse-proxy",
            "Keter's global reverse-proxy list is not supported: put each entry in a bundle as a `type: reverse-proxy` stanza",
        );
    }
}

/// `drain-time` (seconds), or Keter's `graceful-drain-micros` (microseconds) when it is the
/// one given; both at once is an error.
fn read_drain_time(f: &mut Fields, problems: &mut Problems) -> Duration {
    let micros = f.uint("graceful-drain-micros", 86_400_000_000, problems);
    let given = f.contains("drain-time");
    let seconds = seconds_or(f, "drain-time", 20.0, problems);
    match micros {
        Some(_) if given => {
            problems.error(
                "graceful-drain-micros",
                "both drain-time and Keter's graceful-drain-micros are given; keep one",
            );
            seconds
        }
        Some(us) => Duration::from_micros(us),
        None => seconds,
    }
}

/// `allowed-static-roots`: absolute folders (relative ones are taken from the configuration
/// file's folder), symlinks resolved, so that a root is compared with what it really is.
fn read_allowed_static_roots(f: &mut Fields, base: &Path, problems: &mut Problems) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (i, text) in f
        .strings("allowed-static-roots", problems)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let key = format!("allowed-static-roots[{i}]");
        let path = normalize(&base.join(&text));
        match path.canonicalize() {
            Ok(real) if real == Path::new("/") => {
                problems.error(key, "/ would let a bundle serve every file of the host")
            }
            Ok(real) if real.is_dir() => out.push(real),
            Ok(_) => problems.error(key, format!("{} is not a folder", path.display())),
            Err(e) => problems.warn(
                key,
                format!(
                    "{}: {e}; no static root is allowed there until it exists and keter restarts",
                    path.display()
                ),
            ),
        }
    }
    out
}

pub use crate::fspath::normalize;

/// A port number key (`external-http-port`, ...): 1 to 65535. Port 0 would put `:0` into
/// every app's `APPROOT`.
fn port_or(f: &mut Fields, key: &'static str, default: u16, problems: &mut Problems) -> u16 {
    match f.uint(key, 65535, problems) {
        Some(0) => {
            problems.error(
                f.path(key),
                "0 is not a port: expected a number from 1 to 65535".to_string(),
            );
            default
        }
        Some(p) => p as u16,
        None => default,
    }
}

fn seconds_or(
    f: &mut Fields,
    key: &'static str,
    default: f64,
    problems: &mut Problems,
) -> Duration {
    let Some(v) = f.raw(key) else {
        return Duration::from_secs_f64(default);
    };
    match seconds(v) {
        Some(s) => Duration::from_secs_f64(s),
        None => {
            problems.error(
                f.path(key),
                format!("expected a number of seconds, found {}", show(v)),
            );
            Duration::from_secs_f64(default)
        }
    }
}

/// The global defaults of the health checks.
fn read_health(f: &mut Fields, problems: &mut Problems) -> HealthChecks {
    let d = HealthChecks::default();
    let timeout = seconds_or(f, "health-check-timeout", d.timeout.as_secs_f64(), problems);
    if timeout.is_zero() {
        problems.error(
            f.path("health-check-timeout"),
            "must be more than 0 seconds (health-check-interval: 0 turns the checks off)",
        );
    }
    HealthChecks {
        interval: seconds_or(
            f,
            "health-check-interval",
            d.interval.as_secs_f64(),
            problems,
        ),
        failures: match f.uint("health-check-failures", 1000, problems) {
            Some(0) => {
                problems.error(f.path("health-check-failures"), "must be at least 1");
                d.failures
            }
            Some(n) => n as u32,
            None => d.failures,
        },
        timeout: if timeout.is_zero() {
            d.timeout
        } else {
            timeout
        },
    }
}

/// The keys of automatic rollback.
fn read_rollback(f: &mut Fields, problems: &mut Problems) -> AutoRollback {
    let d = AutoRollback::default();
    let mut number =
        |f: &mut Fields, key: &'static str, default: f64, ok: fn(f64) -> bool, what: &str| {
            let Some(v) = f.raw(key) else {
                return default;
            };
            match seconds(v).filter(|n| ok(*n)) {
                Some(n) => n,
                None => {
                    problems.error(f.path(key), format!("expected {what}, found {}", show(v)));
                    default
                }
            }
        };
    let window = number(
        f,
        "rollback-window",
        d.window.as_secs_f64(),
        |_| true,
        "a number of seconds (0 turns automatic rollback off)",
    );
    let error_ratio = number(
        f,
        "rollback-error-ratio",
        d.error_ratio,
        |n| n > 0.0 && n <= 1.0,
        "a share of requests above 0 and at most 1 (0.05 for 5 %)",
    );
    let error_factor = number(
        f,
        "rollback-error-factor",
        d.error_factor,
        |n| n >= 1.0,
        "a factor of at least 1",
    );
    AutoRollback {
        window: Duration::from_secs_f64(window),
        min_requests: f
            .uint("rollback-min-requests", u64::MAX, problems)
            .unwrap_or(d.min_requests),
        error_ratio,
        error_factor,
    }
}

/// A non-negative number of seconds below a day (fractions allowed: tests use short times).
pub(crate) fn seconds(v: &Value) -> Option<f64> {
    let s = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (s.is_finite() && (0.0..=86_400.0).contains(&s)).then_some(s)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        other => yaml::type_name(other).to_string(),
    }
}

fn read_nginx(f: &mut Fields, base: &Path, problems: &mut Problems) -> Option<NginxConfig> {
    let mut config = NginxConfig {
        mode: NginxMode::Managed,
        binary: PathBuf::from("nginx"),
        pid_file: PathBuf::from("/run/nginx.pid"),
        reload_timeout: Duration::from_secs(10),
        user: None,
    };
    let Some(v) = f.raw("nginx") else {
        return Some(config);
    };
    let mut n = Fields::new(v, "nginx", problems)?;
    let mut ok = true;
    if let Some(mode) = n.string("mode", problems) {
        config.mode = match mode.as_str() {
            "managed" => NginxMode::Managed,
            "system" => NginxMode::System,
            other => {
                problems.error(
                    "nginx.mode",
                    format!("expected \"managed\" or \"system\", found {other:?}"),
                );
                ok = false;
                NginxMode::Managed
            }
        };
    }
    if let Some(b) = n.string("binary", problems) {
        config.binary = if b.contains('/') {
            normalize(&base.join(b))
        } else {
            PathBuf::from(b)
        };
    }
    if let Some(p) = n.string("pid-file", problems) {
        config.pid_file = normalize(&base.join(p));
    }
    config.reload_timeout = seconds_or(&mut n, "reload-timeout", 10.0, problems);
    if let Some(user) = n.string("user", problems) {
        match nix::unistd::User::from_name(&user) {
            Ok(Some(_)) if crate::isolation::users::is_plain_name(&user) => {
                config.user = Some(user)
            }
            Ok(Some(_)) => problems.error(
                "nginx.user",
                format!("{user:?} cannot be written into an Nginx file"),
            ),
            _ => {
                problems.error("nginx.user", format!("no user {user:?} on this system"));
                ok = false;
            }
        }
    }
    n.finish(problems);
    ok.then_some(config)
}

/// The `postgres` section: `host` (a host name, an IP address or a socket folder; default
/// `localhost`), `port` (5432), `user` (required), `password-file` (optional, for trust or peer
/// authentication), `database` (`postgres`), `server-user` (`postgres`: who may hold a local
/// server's listener). The password is read now, so that a missing file stops keter at start
/// rather than failing a deploy later; it is never logged. The server's user is looked up at
/// each connection, not now: a host whose server is elsewhere needs no such user.
fn read_postgres(f: &mut Fields, base: &Path, problems: &mut Problems) -> Option<PostgresAdmin> {
    let v = f.raw("postgres")?;
    let mut p = Fields::new(v, "postgres", problems)?;
    let host = p
        .string("host", problems)
        .unwrap_or_else(|| "localhost".into());
    let port = p.uint("port", 65535, problems).map_or(5432, |n| n as u16);
    let server = match Server::new(&host, port) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.error("postgres.host", e);
            None
        }
    };
    let user = p.string("user", problems);
    match &user {
        None if !problems.errors.iter().any(|e| e.key == "postgres.user") => problems.error(
            "postgres.user",
            "required: the admin role (with CREATEROLE and CREATEDB) keter connects as",
        ),
        Some(u) if u.is_empty() || u.contains('\0') => {
            problems.error("postgres.user", "expected a role name")
        }
        _ => {}
    }
    let database = p
        .string("database", problems)
        .unwrap_or_else(|| "postgres".into());
    if database.is_empty() || database.contains('\0') {
        problems.error("postgres.database", "expected a database name");
    }
    // A number (a uid) is read as its digits.
    let server_user = match p.string("server-user", problems) {
        None => "postgres".to_string(),
        Some(u) if is_user_name(&u) => u,
        Some(u) => {
            problems.error(
                "postgres.server-user",
                format!(
                    "{u:?} is not a user name or a uid (the user the PostgreSQL server runs as)"
                ),
            );
            String::new()
        }
    };
    let password = match p.string("password-file", problems) {
        None => Some(None),
        Some(file) => read_password_file(&normalize(&base.join(file)), problems).map(Some),
    };
    p.finish(problems);
    let (server, user, password) = (server?, user?, password?);
    (!problems
        .errors
        .iter()
        .any(|e| e.key.starts_with("postgres")))
    .then_some(PostgresAdmin {
        server,
        user,
        password,
        database,
        server_user,
    })
}

/// A name `useradd` would take: letters, digits, `_`, `-`, `.`, not starting with `-`, at most
/// 32 bytes.
fn is_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The first line of a password file (a trailing newline is not part of the password).
fn read_password_file(path: &Path, problems: &mut Problems) -> Option<Secret> {
    let key = "postgres.password-file";
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            problems.error(key, format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            problems.warn(
                key,
                format!(
                    "{} may be read by other users (mode {:o}); run chmod 600 on it",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ),
            );
        }
    }
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() || password.contains(['\n', '\0']) {
        problems.error(
            key,
            format!(
                "{} must hold the password alone on one line",
                path.display()
            ),
        );
        return None;
    }
    Some(Secret::new(password.to_string()))
}

fn read_port_range(f: &mut Fields, problems: &mut Problems) -> Option<RangeInclusive<u16>> {
    let Some(v) = f.raw("port-range") else {
        return Some(4000..=4999);
    };
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            problems.error(
                "port-range",
                format!(
                    "expected FIRST-LAST such as 4000-4999, found {}",
                    show(other)
                ),
            );
            return None;
        }
    };
    let parsed = text.split_once('-').and_then(|(a, b)| {
        let a: u16 = a.trim().parse().ok()?;
        let b: u16 = b.trim().parse().ok()?;
        (a >= 1 && a <= b).then_some(a..=b)
    });
    if parsed.is_none() {
        problems.error(
            "port-range",
            format!("expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535, found {text:?}"),
        );
    }
    parsed
}

/// `app-uid-range: FIRST-LAST`. The default, 65536-99999, is above the 16-bit ids (Debian
/// Policy 9.2.2 leaves 65536 and up to dynamically allocated accounts, and systemd's dynamic
/// users end at 65519) and below 100000, where `useradd` starts the subordinate ids of
/// rootless containers.
fn read_uid_range(f: &mut Fields, problems: &mut Problems) -> RangeInclusive<u32> {
    const DEFAULT: RangeInclusive<u32> = 65536..=99999;
    let Some(v) = f.raw("app-uid-range") else {
        return DEFAULT;
    };
    let text = match v {
        Value::String(s) => s.clone(),
        other => {
            problems.error(
                "app-uid-range",
                format!(
                    "expected FIRST-LAST such as 65536-99999, found {}",
                    show(other)
                ),
            );
            return DEFAULT;
        }
    };
    let parsed = text.split_once('-').and_then(|(a, b)| {
        let a: u32 = a.trim().parse().ok()?;
        let b: u32 = b.trim().parse().ok()?;
        (1000 <= a && a <= b && b < 1 << 31).then_some(a..=b)
    });
    parsed.unwrap_or_else(|| {
        problems.error(
            "app-uid-range",
            format!(
                "expected FIRST-LAST with 1000 <= FIRST <= LAST < 2147483648 (system users and \
                 root stay out of it), found {text:?}"
            ),
        );
        DEFAULT
    })
}

fn read_limits(f: &mut Fields, problems: &mut Problems) -> BundleLimits {
    let mut limits = BundleLimits::default();
    if let Some(b) = f.uint("max-bundle-bytes", u64::MAX, problems) {
        limits.max_bytes = b;
    }
    if let Some(n) = f.uint("max-bundle-entries", u64::MAX, problems) {
        limits.max_entries = n;
    }
    if let Some(d) = f.uint("max-bundle-depth", 4096, problems) {
        limits.max_depth = d as usize;
    }
    limits
}

/// All errors of a config as one message per line (for `keter check` and start-up failures).
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> (Option<Config>, Problems) {
        let tree = yaml::parse(text).unwrap();
        let mut p = Problems::new("keter-config.yaml");
        let c = from_tree(&tree, None, Path::new("/etc/keter"), &mut p);
        (c, p)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let (c, p) = check("root: ../opt\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.root, PathBuf::from("/etc/opt"));
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(
            (c.listeners[0].port, c.listeners[0].tls.is_none()),
            (80, true)
        );
        assert_eq!(c.client_max_body_size, 0);
        assert!(c.allowed_static_roots.is_empty());
        assert_eq!(c.readiness_timeout, Duration::from_secs(90));
        assert_eq!(c.drain_time, Duration::from_secs(20));
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(c.port_range, 4000..=4999);
        assert_eq!(c.connection_time_bound, Some(Duration::from_secs(300)));
        assert_eq!(c.nginx.mode, NginxMode::Managed);
        assert_eq!(c.run_as, None);
        assert!(!c.run_apps_as_root);
        assert_eq!(c.app_uid_range, 65536..=99999);
        assert_eq!(c.acme_webroot, PathBuf::from("/etc/opt/acme"));
        assert_eq!(
            (c.log_rotate_bytes, c.log_rotate_keep),
            (5 * 1024 * 1024, 20)
        );
    }

    #[test]
    fn external_ports_must_be_real_ports() {
        for key in ["external-http-port", "external-https-port"] {
            let (_, p) = check(&format!("root: /r\n{key}: 0\n"));
            assert_eq!(
                p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                [format!(
                    "keter-config.yaml: {key}: 0 is not a port: expected a number from 1 to 65535"
                )]
            );
            let (c, p) = check(&format!("root: /r\n{key}: 8443\n"));
            assert!(p.errors.is_empty(), "{:?}", p.errors);
            let c = c.unwrap();
            assert!(c.external_http_port == 8443 || c.external_https_port == 8443);
        }
    }

    #[test]
    fn setuid_resolves_the_user_and_its_groups() {
        let (c, p) = check("root: /r\nsetuid: nobody\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let user = c.unwrap().run_as.unwrap();
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert_eq!(
            (user.uid, user.gid),
            (nobody.uid.as_raw(), nobody.gid.as_raw())
        );
        assert!(user.groups.contains(&nobody.gid.as_raw()));
        let (_, p) = check("root: /r\nsetuid: no-such-user-here\n");
        assert_eq!(
            p.errors[0].to_string(),
            "keter-config.yaml: setuid: no user \"no-such-user-here\" on this system"
        );
    }

    #[test]
    fn root_is_only_ever_asked_for_with_run_apps_as_root() {
        let (c, p) = check("root: /r\nrun-apps-as-root: true\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(c.unwrap().run_apps_as_root);
        let (_, p) = check("root: /r\nsetuid: root\n");
        assert_eq!(
            p.errors[0].to_string(),
            "keter-config.yaml: setuid: root is root: to run apps as root, remove setuid and say run-apps-as-root: true"
        );
        let (_, p) = check("root: /r\nsetuid: nobody\nrun-apps-as-root: true\n");
        assert_eq!(p.errors[0].key, "run-apps-as-root");
        let (c, p) = check("root: /r\napp-uid-range: 70000-70999\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(c.unwrap().app_uid_range, 70000..=70999);
        for bad in ["0-100", "5000-4000", "x", "1000-4294967295"] {
            let (_, p) = check(&format!("root: /r\napp-uid-range: {bad:?}\n"));
            assert_eq!(p.errors[0].key, "app-uid-range", "{bad}");
        }
    }

    #[test]
    fn keter_flat_listener_form() {
        let (c, p) = check("root: /opt/keter\nhost: 127.0.0.1\nport: 8080\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let l = &c.unwrap().listeners[0];
        assert_eq!(l.nginx_addresses(), ["127.0.0.1:8080"]);
    }

    #[test]
    fn limits_and_their_errors() {
        let (c, p) = check(
            "root: /srv\nmemory-limit: 512M\ncpu-limit: 1.5\ntasks-limit: 256\ncgroup: /keter\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(
            c.process_limits,
            crate::cgroup::Limits {
                memory: Some(512 << 20),
                cpu_millis: Some(1500),
                tasks: Some(256)
            }
        );
        assert_eq!(c.cgroup.as_deref(), Some("/keter"));
        let (_, p) = check(
            "root: /srv\nmemory-limit: lots\ncpu-limit: all\ntasks-limit: -1\ncgroup: keter/../x\n",
        );

        let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        for e in [
            "keter-config.yaml: memory-limit: expected a size such as 10485760, \"10m\"",
            "keter-config.yaml: cpu-limit: expected a number of cores such as 1.5",
            "keter-config.yaml: tasks-limit: ",
            "keter-config.yaml: cgroup: expected an absolute path in the cgroup tree",
        ] {
            assert!(
                msgs.iter().any(|m| m.starts_with(e)),
                "missing {e:?} in {msgs:#?}"
            );
        }
        let (_, p) = check("root: /srv\nmemory-limit: 1k\n");
        assert!(
            p.errors[0].to_string().contains("too little"),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let (c, p) = check(
            "listeners: [{host: nowhere.invalid, port: 70000}]\nreadiness-timeout: soon\nport-range: 5-1\nnginx: {mode: fancy}\nbogus: 1\n",
        );
        assert!(c.is_none());
        let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        let expected = [
            "keter-config.yaml: root: required",
            "keter-config.yaml: listeners[0].host: cannot resolve the host name \"nowhere.invalid\"",
            "keter-config.yaml: listeners[0].port: 70000 is too large (at most 65535)",
            "keter-config.yaml: nginx.mode: expected \"managed\" or \"system\", found \"fancy\"",
            "keter-config.yaml: readiness-timeout: expected a number of seconds, found \"soon\"",
            "keter-config.yaml: port-range: expected FIRST-LAST",
        ];
        for e in expected {
            assert!(
                msgs.iter().any(|m| m.starts_with(e)),
                "missing {e:?} in {msgs:#?}"
            );
        }
        assert_eq!(
            p.warnings[0].to_string(),
            "keter-config.yaml: bogus: unknown key, ignored"
        );
    }

    #[test]
    fn system_mode_with_its_pid_file() {
        let (c, p) = check("root: /opt/keter\nnginx: {mode: system, pid-file: /run/nginx.pid}\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let n = c.unwrap().nginx;
        assert_eq!(n.mode, NginxMode::System);
        assert_eq!(n.pid_file, PathBuf::from("/run/nginx.pid"));
    }

    #[test]
    fn tls_listeners_and_keters_flat_ssl_form() {
        let (c, p) = check(
            "root: /r\nlisteners:\n  - {port: 8080}\n  - {host: 127.0.0.1, key: k.pem, certificate: c.pem, chain-certificates: [chain.pem]}\nssl: {key: /k2, certificate: /c2}\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let l = c.unwrap().listeners;
        assert_eq!(l.len(), 3);
        let tls = l[1].tls.as_ref().unwrap();
        assert_eq!(l[1].port, 443);
        assert_eq!(tls.key, PathBuf::from("/etc/keter/k.pem"));
        assert_eq!(
            tls.chain_certificates,
            vec![PathBuf::from("/etc/keter/chain.pem")]
        );
        assert_eq!(l[2].port, 443);
        assert!(l[2].nginx_addresses().contains(&"443".to_string()));
        let (_, p) = check("root: /r\nlisteners: [{key: \"/a b\", certificate: /c}]\n");
        assert!(
            p.errors[0]
                .to_string()
                .contains("cannot be written into an Nginx file"),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn health_checks_default_and_are_read() {
        let (c, p) = check("root: /r\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let h = c.unwrap().health;
        assert_eq!(
            (h.interval, h.failures, h.timeout),
            (Duration::from_secs(10), 3, Duration::from_secs(5))
        );
        let (c, p) = check(
            "root: /r\nhealth-check-interval: 0.3\nhealth-check-failures: 2\nhealth-check-timeout: 0.5\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let h = c.unwrap().health;
        assert_eq!(
            (h.interval, h.failures, h.timeout),
            (Duration::from_millis(300), 2, Duration::from_millis(500))
        );
        let (_, p) = check("root: /r\nhealth-check-failures: 0\nhealth-check-timeout: 0\n");
        let messages: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("health-check-failures: must be at least 1")),
            "{messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("health-check-timeout: must be more than 0")),
            "{messages:?}"
        );
    }

    #[test]
    fn postgres_section_reads_the_password_file_and_never_shows_it() {
        let dir = std::env::temp_dir().join(format!("keter-unit-pgcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pg-password");
        std::fs::write(&file, "s3cret-admin\n").unwrap();
        let text = format!(
            "root: /r\npostgres: {{host: 127.0.0.1, port: 5433, user: keter, password-file: {}}}\n",
            file.display()
        );
        let (c, p) = check(&text);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let pg = c.unwrap().postgres.unwrap();
        assert_eq!(pg.server.host(), "127.0.0.1");
        assert_eq!(pg.server.port, 5433);
        assert_eq!(pg.user, "keter");
        assert_eq!(pg.database, "postgres");
        assert_eq!(pg.server_user, "postgres");
        assert_eq!(pg.password.as_ref().unwrap().expose(), "s3cret-admin");
        assert!(!format!("{pg:?}").contains("s3cret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn postgres_section_errors_name_their_keys() {
        let (c, p) = check(
            "root: /r\npostgres: {host: \"a b\", password-file: /nonexistent/pw, colour: red}\n",
        );
        assert!(c.is_none_or(|c| c.postgres.is_none()));
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        for k in ["postgres.host", "postgres.user", "postgres.password-file"] {
            assert!(keys.contains(&k), "{k} missing in {keys:?}");
        }
        assert_eq!(p.warnings[0].key, "postgres.colour");
        let (c, p) = check("root: /r\npostgres: {host: /var/run/postgresql, user: keter}\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let pg = c.unwrap().postgres.unwrap();
        assert!(pg.server.is_socket() && pg.password.is_none());
        for (given, read) in [
            ("pgsql", "pgsql"),
            ("101", "101"),
            ("\"_pg-1.x\"", "_pg-1.x"),
        ] {
            let (c, p) = check(&format!(
                "root: /r\npostgres: {{user: keter, server-user: {given}}}\n"
            ));
            assert!(p.errors.is_empty(), "{given}: {:?}", p.errors);
            assert_eq!(c.unwrap().postgres.unwrap().server_user, read);
        }
        for bad in ["\"a b\"", "\"\"", "-1", "[x]", "\"-x\""] {
            let (c, p) = check(&format!(
                "root: /r\npostgres: {{user: keter, server-user: {bad}}}\n"
            ));
            assert!(c.is_none_or(|c| c.postgres.is_none()), "{bad}");
            assert_eq!(
                p.errors[0].key, "postgres.server-user",
                "{bad}: {:?}",
                p.errors
            );
        }
    }

    #[test]
    fn fractional_seconds_and_zero_time_bound() {
        let (c, p) = check("root: /r\nreadiness-timeout: 0.5\nconnection-time-bound: 0\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.readiness_timeout, Duration::from_millis(500));
        assert_eq!(c.connection_time_bound, None);
    }
    #[test]
    fn keter_global_keys_keter_replaces() {
        let (c, p) = check(
            "root: /r\ngraceful-drain-micros: 1500000\ncli-port: 1234\napp-crash-hook: /bin/true\nport-manager: {}\nclient-max-body-size: 64m\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.drain_time, Duration::from_millis(1500));
        assert_eq!(c.client_max_body_size, 64 << 20);
        let warned: Vec<&str> = p.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(warned, ["cli-port", "app-crash-hook", "port-manager"]);
        assert!(p.warnings.iter().all(|w| !w.message.contains("unknown")));
        let (_, p) = check("root: /r\nenv: {PORT: \"80\", LANG: C}\nreverse-proxy: []\n");
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["env.PORT", "reverse-proxy"]);
    }

    #[test]
    fn allowed_static_roots_resolve_symlinks() {
        let dir = std::env::temp_dir().join(format!("keter-unit-roots-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("real"), &link).unwrap();
        let (c, p) = check(&format!(
            "root: /r\nallowed-static-roots: [{}, {}/missing]\n",
            link.display(),
            dir.display()
        ));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(
            c.unwrap().allowed_static_roots,
            vec![dir.join("real").canonicalize().unwrap()]
        );
        assert_eq!(p.warnings[0].key, "allowed-static-roots[1]");
        let (_, p) = check("root: /r\nallowed-static-roots: [/]\n");
        assert_eq!(p.errors[0].key, "allowed-static-roots[0]");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
