//! A bundle's `config/keter.yaml`, in either of Keter's two formats (the README's "Bundles":
//! the flat format of Keter's first README and the stanza format), read into validated
//! stanzas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::middleware::{self, Middlewares};
use super::served::{self, Redirect, ReverseProxy, Served, StaticFiles, Tls};
use crate::names::{Host, Hostname, UrlPath, check_env_name, check_env_value};
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// Variables that always carry the port keter gives a webapp; a bundle may not set them (an
/// app listening elsewhere fails its own readiness check).
pub const PORT_ENV: [&str; 2] = ["PORT", "YESOD_PORT"];

/// Keys of the `yesod keter` command (yesod-bin) that Yesod's scaffolds put into the same
/// file; Keter ignores them, and so does keter, without calling them unknown.
pub const YESOD_KETER_KEYS: [&str; 5] = [
    "user-edited",
    "copy-to",
    "copy-to-args",
    "copy-to-port",
    "extraFiles",
];

/// A bundle's validated configuration: at least one stanza.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleConfig {
    /// Processes that answer HTTP behind Nginx.
    pub webapps: Vec<WebApp>,
    /// Processes supervised without a port or an Nginx file.
    pub background: Vec<Background>,
    /// Folders Nginx serves itself.
    pub statics: Vec<StaticFiles>,
    pub redirects: Vec<Redirect>,
    pub proxies: Vec<ReverseProxy>,
    /// The postgres plugin: the app gets its own role and database (README, "PostgreSQL plugin").
    pub postgres: bool,
    /// The app's own `keep-releases` and `rollback-window` (README "Releases and rollback"),
    /// over the global ones.
    pub keep_releases: Option<usize>,
    pub rollback_window: Option<Duration>,
}

impl BundleConfig {
    /// Drops the spare capacity of the stanza lists: a version keeps its configuration for as
    /// long as it runs, and a list grown by pushes holds room for four stanzas (of several
    /// hundred bytes each) where a bundle usually has one.
    fn shrink_to_fit(&mut self) {
        self.webapps.shrink_to_fit();
        self.background.shrink_to_fit();
        self.statics.shrink_to_fit();
        self.redirects.shrink_to_fit();
        self.proxies.shrink_to_fit();
    }
}

/// What to run, common to every process stanza.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The executable, as written: relative to `config/` (then inside the bundle), or an
    /// absolute path on the host (NixOS's module writes `/nix/store/...`). Resolved and
    /// checked by `bundle::resolve_exec`.
    pub exec: PathBuf,
    pub args: Vec<String>,
    /// Stanza `env`: names valid and none of [`PORT_ENV`].
    pub env: BTreeMap<String, String>,
    /// Names of keter's own environment variables to pass on.
    pub forward_env: Vec<String>,
    /// Where the stanza is in the file (`stanzas[1]`, or empty for the flat format), for
    /// messages.
    pub origin: String,
    /// `memory-limit`, `cpu-limit`, `tasks-limit` (README "Limits and accounting"); the
    /// global ones apply where these are absent.
    pub limits: crate::cgroup::Limits,
}

impl Program {
    /// The key path of one of this stanza's keys, for messages.
    pub fn key(&self, key: &str) -> String {
        if self.origin.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.origin)
        }
    }
}

/// A `webapp` stanza (or the flat format's top level).
#[derive(Debug, Clone, PartialEq)]
pub struct WebApp {
    pub program: Program,
    /// Non-empty, no duplicates; the first builds APPROOT and is the readiness check's `Host`.
    pub hosts: Vec<Host>,
    /// The hosts Nginx routes to this webapp: `hosts` less those another stanza serves.
    pub routed: Vec<Host>,
    /// `ssl`: certificates; anything but `Off` makes `APPROOT` use `https://`.
    pub tls: Tls,
    /// Plain HTTP requests get a 301 to HTTPS.
    pub requires_secure: bool,
    /// More environment variables that receive the port (Keter's `port-env-vars`).
    pub port_env_vars: Vec<String>,
    /// Requested with the first host as `Host` until it answers below 500.
    pub health_check_path: UrlPath,
    /// Overrides the global readiness timeout (Keter's `ensure-alive-time-bound`).
    pub readiness_timeout: Option<Duration>,
    /// Override the global health checks while it serves (`health-check-interval`, 0 for
    /// none; `health-check-failures`; `health-check-timeout`).
    pub health_check_interval: Option<Duration>,
    pub health_check_failures: Option<u32>,
    pub health_check_timeout: Option<Duration>,
    /// Overrides the global per-request bound; `Some(None)` means no bound.
    pub connection_time_bound: Option<Option<Duration>>,
    /// keter's `client-max-body-size` for this stanza; `None` for the global one.
    pub max_body: Option<u64>,
    pub middleware: Middlewares,
}

/// A `background` stanza: a process with no port, restarted as Keter does.
#[derive(Debug, Clone, PartialEq)]
pub struct Background {
    pub program: Program,
    /// Restarts in a row allowed (`None`: unlimited, Keter's default).
    pub restart_count: Option<u32>,
    /// Pause before each restart (Keter's `restart-delay-seconds`, default 5).
    pub restart_delay: Duration,
}

/// One entry of `stanzas`.
enum Stanza {
    Web(WebApp),
    Background(Background),
    Static(StaticFiles),
    Redirect(Redirect),
    Proxy(ReverseProxy),
}

impl WebApp {
    /// `APPROOT` uses `https://`.
    pub fn https(&self) -> bool {
        self.tls != Tls::Off
    }
}

impl BundleConfig {
    /// Every host name of every stanza (without ports: Nginx routes by name), in order. Two
    /// apps cannot share one.
    pub fn hosts(&self) -> impl Iterator<Item = &Hostname> {
        self.webapps
            .iter()
            .flat_map(|w| w.hosts.iter())
            .chain(self.served().flat_map(|s| s.hosts.iter()))
            .map(|h| &h.name)
    }

    /// Every stanza with hosts: its `ssl`, its hosts and the key path of its `ssl`.
    pub fn tls_stanzas(&self) -> Vec<(&Tls, &[Host], String)> {
        self.webapps
            .iter()
            .map(|w| (&w.tls, w.hosts.as_slice(), w.program.key("ssl")))
            .chain(
                self.served()
                    .map(|s| (&s.tls, s.hosts.as_slice(), s.key("ssl"))),
            )
            .collect()
    }

    /// The host sets of the stanzas with `ssl: acme` that Nginx routes hosts to: what this
    /// configuration wants certificates for (checked by `bundle::check_config`, so a set that
    /// cannot be made is left out).
    pub fn acme_sets(&self) -> Vec<crate::acme::HostSet> {
        let routed = self
            .webapps
            .iter()
            .map(|w| (&w.tls, w.routed.as_slice()))
            .chain(self.served().map(|s| (&s.tls, s.routed.as_slice())));
        let mut out: Vec<crate::acme::HostSet> = Vec::new();
        for (tls, hosts) in routed {
            if *tls != Tls::Acme {
                continue;
            }
            if let Some(set) = acme_set(hosts)
                && !out.contains(&set)
            {
                out.push(set);
            }
        }
        out
    }

    /// The shared keys of every stanza Nginx serves by itself.
    fn served(&self) -> impl Iterator<Item = &Served> {
        self.statics
            .iter()
            .map(|s| &s.served)
            .chain(self.redirects.iter().map(|r| &r.served))
            .chain(self.proxies.iter().map(|p| &p.served))
    }
}

/// The host set of one certificate for `hosts` (ports dropped: a certificate names hosts);
/// `None` when there are none or one is a wildcard.
pub fn acme_set(hosts: &[Host]) -> Option<crate::acme::HostSet> {
    let names: Vec<Hostname> = hosts.iter().map(|h| h.name.clone()).collect();
    crate::acme::HostSet::new(&names).ok()
}

/// Reads a parsed `keter.yaml`. Problems are recorded with `problems`' file name.
pub fn from_tree(tree: &Value, problems: &mut Problems) -> Option<BundleConfig> {
    let mut f = Fields::new(tree, "", problems)?;
    let mut config = BundleConfig {
        webapps: Vec::new(),
        background: Vec::new(),
        statics: Vec::new(),
        redirects: Vec::new(),
        proxies: Vec::new(),
        postgres: false,
        keep_releases: None,
        rollback_window: None,
    };
    // Stanzas in the order of the file (the flat format's webapp, static hosts, redirects,
    // as Keter converts them): which stanza a shared host goes to depends on it.
    let mut order: Vec<Slot> = Vec::new();
    let mut ok = true;
    for key in YESOD_KETER_KEYS {
        f.raw(key);
    }
    config.keep_releases = match f.uint("keep-releases", 1000, problems) {
        Some(0) => {
            problems.error(
                f.path("keep-releases"),
                "0 keeps no release, not even the serving one: at least 1",
            );
            None
        }
        n => n.map(|n| n as usize),
    };
    config.rollback_window = read_seconds(&mut f, "rollback-window", true, problems);
    if f.contains("stanzas") {
        // A scaffold's leftover `exec` beside `stanzas` is read by `yesod keter`, not Keter.
        f.raw("exec");
        match f.raw("stanzas") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match read_stanza(item, &format!("stanzas[{i}]"), problems) {
                        Some(Stanza::Web(w)) => {
                            order.push(Slot::Web(config.webapps.len()));
                            config.webapps.push(w);
                        }
                        Some(Stanza::Background(b)) => config.background.push(b),
                        Some(Stanza::Static(st)) => {
                            order.push(Slot::Static(config.statics.len()));
                            config.statics.push(st);
                        }
                        Some(Stanza::Redirect(r)) => {
                            order.push(Slot::Redirect(config.redirects.len()));
                            config.redirects.push(r);
                        }
                        Some(Stanza::Proxy(p)) => {
                            order.push(Slot::Proxy(config.proxies.len()));
                            config.proxies.push(p);
                        }
                        None => ok = false,
                    }
                }
            }
            other => {
                problems.error(
                    "stanzas",
                    format!(
                        "expected a list of stanzas, found {}",
                        other.map_or("nothing", yaml::type_name)
                    ),
                );
                ok = false;
            }
        }
        if let Some(plugins) = f.raw("plugins") {
            match read_plugins(plugins, problems) {
                Some(pg) => config.postgres = pg,
                None => ok = false,
            }
        }
        f.finish(problems);
    } else {
        // The flat format: the top level is one webapp when it names `exec` or `host` (Keter
        // 0.3.5 and later also accept a bundle of only static hosts and redirects).
        let errors_before = problems.errors.len();
        if (f.contains("exec") || f.contains("host"))
            && let Some(w) = read_webapp(&mut f, true, problems)
        {
            order.push(Slot::Web(0));
            config.webapps.push(w);
        }
        if let Some(v) = f.raw("static-hosts") {
            config.statics = served::read_flat_static(v, problems);
            order.extend((0..config.statics.len()).map(Slot::Static));
        }
        if let Some(v) = f.raw("redirects") {
            config.redirects = served::read_flat_redirects(v, problems);
            order.extend((0..config.redirects.len()).map(Slot::Redirect));
        }
        config.postgres = f.bool("postgres", problems).unwrap_or(false);
        ok &= problems.errors.len() == errors_before;
        f.finish(problems);
    }
    if ok && order.is_empty() {
        problems.error(
            "",
            "the bundle has no webapp, static-files, redirect or reverse-proxy stanza (nor, in the flat format, `exec` and `host`, `static-hosts` or `redirects`); nothing would be served",
        );
        ok = false;
    }
    if ok {
        ok = route_hosts(&mut config, &order, problems);
    }
    config.shrink_to_fit();
    (ok && !problems.has_errors()).then_some(config)
}

/// A stanza with hosts, by kind and index, in file order.
#[derive(Clone, Copy)]
enum Slot {
    Web(usize),
    Static(usize),
    Redirect(usize),
    Proxy(usize),
}

/// Decides which stanza serves a host that several stanzas list, as Keter's table of hosts
/// does: the first one in the file, except that a reverse-proxy stanza takes the host over
/// from the stanzas before it (Keter inserts its host where the others add theirs only when
/// it is new). Each case is a warning naming both stanzas. Nginx routes by name without the
/// port, so the same name with different ports in two stanzas is an error. Returns false on
/// error.
fn route_hosts(config: &mut BundleConfig, order: &[Slot], problems: &mut Problems) -> bool {
    let hosts_of = |c: &BundleConfig, slot: Slot| -> (Vec<Host>, String) {
        match slot {
            Slot::Web(i) => (
                c.webapps[i].hosts.clone(),
                c.webapps[i].program.origin.clone(),
            ),
            Slot::Static(i) => (
                c.statics[i].served.hosts.clone(),
                c.statics[i].served.origin.clone(),
            ),
            Slot::Redirect(i) => (
                c.redirects[i].served.hosts.clone(),
                c.redirects[i].served.origin.clone(),
            ),
            Slot::Proxy(i) => (
                c.proxies[i].served.hosts.clone(),
                c.proxies[i].served.origin.clone(),
            ),
        }
    };
    let label = |origin: &str| {
        if origin.is_empty() {
            "the flat format's webapp".to_string()
        } else {
            origin.to_string()
        }
    };
    // Host name -> (the host as the winning stanza lists it, its position in `order`).
    let mut owner: BTreeMap<Hostname, (Host, usize)> = BTreeMap::new();
    let mut ok = true;
    for (pos, slot) in order.iter().enumerate() {
        let (hosts, origin) = hosts_of(config, *slot);
        for h in hosts {
            match owner.get(&h.name).cloned() {
                None => {
                    owner.insert(h.name.clone(), (h, pos));
                }
                Some((_, prev)) if prev == pos => {
                    // The same name with and without a port in one stanza: the bare name
                    // answers every port already.
                    if h.port.is_none() {
                        owner.insert(h.name.clone(), (h, pos));
                    }
                }
                Some((theirs, prev)) => {
                    let their_origin = hosts_of(config, order[prev]).1;
                    if theirs.port != h.port {
                        problems.error(
                            join(&origin, "hosts"),
                            format!(
                                "{h} here and {theirs} in {}: Nginx routes by host name without the port, so one stanza must serve both",
                                label(&their_origin)
                            ),
                        );
                        ok = false;
                        continue;
                    }
                    let takes_over = matches!(slot, Slot::Proxy(_));
                    let winner = if takes_over { &origin } else { &their_origin };
                    problems.warn(
                        join(&origin, "hosts"),
                        format!(
                            "the host {h} is also listed by {}; as in Keter, {} serves it",
                            label(&their_origin),
                            label(winner)
                        ),
                    );
                    if takes_over {
                        owner.insert(h.name.clone(), (h, pos));
                    }
                }
            }
        }
    }
    let routed_of = |pos: usize, hosts: &[Host]| -> Vec<Host> {
        hosts
            .iter()
            .filter(|h| owner.get(&h.name).is_some_and(|(_, p)| *p == pos))
            .cloned()
            .collect()
    };
    for (pos, slot) in order.iter().enumerate() {
        match *slot {
            Slot::Web(i) => config.webapps[i].routed = routed_of(pos, &config.webapps[i].hosts),
            Slot::Static(i) => {
                config.statics[i].served.routed = routed_of(pos, &config.statics[i].served.hosts)
            }
            Slot::Redirect(i) => {
                config.redirects[i].served.routed =
                    routed_of(pos, &config.redirects[i].served.hosts)
            }
            Slot::Proxy(i) => {
                config.proxies[i].served.routed = routed_of(pos, &config.proxies[i].served.hosts)
            }
        }
    }
    ok
}

fn join(origin: &str, key: &str) -> String {
    served::join_key(origin, key)
}

/// One stanza; `None` on error (recorded in `problems`).
fn read_stanza(v: &Value, path: &str, problems: &mut Problems) -> Option<Stanza> {
    let mut f = Fields::new(v, path, problems)?;
    let Some(kind) = f.string("type", problems) else {
        problems.error(
            f.path("type"),
            "required: one of webapp, static-files, redirect, reverse-proxy, background",
        );
        return None;
    };
    let stanza = match kind.as_str() {
        "webapp" => read_webapp(&mut f, false, problems).map(Stanza::Web),
        "background" => read_background(&mut f, problems).map(Stanza::Background),
        "static-files" => served::read_static(&mut f, false, problems).map(Stanza::Static),
        "redirect" => served::read_redirect(&mut f, problems).map(Stanza::Redirect),
        "reverse-proxy" => served::read_reverse_proxy(&mut f, problems).map(Stanza::Proxy),
        other => {
            problems.error(
                f.path("type"),
                format!("unknown stanza type {other:?}; expected one of webapp, static-files, redirect, reverse-proxy, background"),
            );
            return None;
        }
    };
    f.finish(problems);
    stanza
}

/// The `plugins` mapping: whether the app asks for a database; `None` on error.
fn read_plugins(v: &Value, problems: &mut Problems) -> Option<bool> {
    let mut f = Fields::new(v, "plugins", problems)?;
    let errors_before = problems.errors.len();
    if let Some(Value::Array(_) | Value::Object(_)) = f.raw("postgres") {
        // Keter's remote form: `postgres: [{server, port}]`.
        problems.error(
            "plugins.postgres",
            "a server per bundle is not supported: keter's global `postgres` section names the server; write `postgres: true`",
        );
        return None;
    }
    let postgres = f.bool("postgres", problems).unwrap_or(false);
    f.finish(problems);
    (problems.errors.len() == errors_before).then_some(postgres)
}

/// The keys every process stanza has: `exec`, `args`, `env`, `forward-env`.
fn read_program(f: &mut Fields, problems: &mut Problems) -> Option<Program> {
    let errors_before = problems.errors.len();
    let exec = f.string("exec", problems);
    if exec.is_none() && !problems.errors.iter().any(|e| e.key == f.path("exec")) {
        problems.error(
            f.path("exec"),
            "required: the program to run, relative to config/ (or an absolute path on the host)",
        );
    }
    if let Some(e) = &exec
        && (e.is_empty() || e.contains('\0'))
    {
        problems.error(f.path("exec"), "expected a file path");
    }
    let args = f.strings("args", problems).unwrap_or_default();
    for (i, a) in args.iter().enumerate() {
        if a.contains('\0') {
            problems.error(format!("{}[{i}]", f.path("args")), "contains a NUL byte");
        }
    }
    let env = f.string_map("env", problems).unwrap_or_default();
    for (k, v) in &env {
        let key = format!("{}.{k}", f.path("env"));
        if PORT_ENV.contains(&k.as_str()) {
            problems.error(key, port_reserved(k));
        } else if let Err(e) = check_env_name(k).and_then(|()| check_env_value(v)) {
            problems.error(key, e);
        }
    }
    let forward_env = f.strings("forward-env", problems).unwrap_or_default();
    let limits = crate::cgroup::read_limits(f, problems);
    for (i, name) in forward_env.iter().enumerate() {
        let key = format!("{}[{i}]", f.path("forward-env"));
        if PORT_ENV.contains(&name.as_str()) {
            problems.error(key, port_reserved(name));
        } else if let Err(e) = check_env_name(name) {
            problems.error(key, e);
        }
    }
    if problems.errors.len() > errors_before {
        return None;
    }
    Some(Program {
        exec: PathBuf::from(exec?),
        args,
        env,
        forward_env,
        origin: f.path("").trim_end_matches('.').to_string(),
        limits,
    })
}

/// Why a bundle may not set `name` (one of [`PORT_ENV`]).
pub fn port_reserved(name: &str) -> String {
    format!(
        "{name} is set by keter to the port it gives the app (its readiness check connects there) and cannot be overridden"
    )
}

/// A number of seconds (fractions allowed), below a day; zero only where `zero` allows it.
fn read_seconds(
    f: &mut Fields,
    key: &'static str,
    zero: bool,
    problems: &mut Problems,
) -> Option<Duration> {
    let v = f.raw(key)?;
    match crate::config::seconds(v) {
        Some(s) if s > 0.0 || zero => Some(Duration::from_secs_f64(s)),
        Some(_) => {
            problems.error(f.path(key), "must be more than 0 seconds");
            None
        }
        None => {
            problems.error(
                f.path(key),
                "expected a number of seconds (below a day)".to_string(),
            );
            None
        }
    }
}

/// A `background` stanza: Keter's `restart-count` (a number or `unlimited`) and
/// `restart-delay-seconds`.
fn read_background(f: &mut Fields, problems: &mut Problems) -> Option<Background> {
    let program = read_program(f, problems);
    let restart_count = match f.raw("restart-count") {
        None => None,
        Some(Value::String(s)) if s == "unlimited" => None,
        Some(v) => {
            let n = yaml::as_uint(v, &f.path("restart-count"), u64::from(u32::MAX), problems);
            Some(n? as u32)
        }
    };
    let restart_delay = match f.uint("restart-delay-seconds", 86_400, problems) {
        Some(s) => Duration::from_secs(s),
        None if problems
            .errors
            .iter()
            .any(|e| e.key == f.path("restart-delay-seconds")) =>
        {
            return None;
        }
        None => Duration::from_secs(5),
    };
    Some(Background {
        program: program?,
        restart_count,
        restart_delay,
    })
}

/// The keys of a webapp. `flat` is the seed's format (hosts in `host` + `extra-hosts`).
fn read_webapp(f: &mut Fields, flat: bool, problems: &mut Problems) -> Option<WebApp> {
    let errors_before = problems.errors.len();
    let program = read_program(f, problems);
    // The flat format names extra hosts `extra-hosts`; stanzas use `hosts`. Both accept `host`.
    let served = served::read_served(f, if flat { "extra-hosts" } else { "hosts" }, problems);
    let port_env_vars = f.strings("port-env-vars", problems).unwrap_or_default();
    for (i, name) in port_env_vars.iter().enumerate() {
        let key = format!("{}[{i}]", f.path("port-env-vars"));
        if let Err(e) = check_env_name(name) {
            problems.error(key, e);
        } else if name == "APPROOT" || name == "YESOD_APPROOT" {
            problems.error(key, format!("{name} holds the app's URL, not its port"));
        } else if let Some(p) = &program
            && p.env.contains_key(name)
        {
            problems.error(
                key,
                format!("{name} is also set in env; it cannot hold both that value and the port"),
            );
        }
    }
    let health_check_path = match f.string("health-check-path", problems) {
        None => UrlPath::new("/").expect("/ is a valid path"),
        Some(p) => match UrlPath::new(&p) {
            Ok(p) => p,
            Err(e) => {
                problems.error(f.path("health-check-path"), e);
                UrlPath::new("/").expect("/ is a valid path")
            }
        },
    };
    // Keter's key is in microseconds.
    let readiness_timeout = f
        .uint("ensure-alive-time-bound", 86_400_000_000, problems)
        .map(Duration::from_micros);
    let health_check_interval = read_seconds(f, "health-check-interval", true, problems);
    let health_check_timeout = read_seconds(f, "health-check-timeout", false, problems);
    let health_check_failures = match f.uint("health-check-failures", 1000, problems) {
        Some(0) => {
            problems.error(f.path("health-check-failures"), "must be at least 1");
            None
        }
        n => n.map(|n| n as u32),
    };
    let connection_time_bound = served::read_time_bound(f, problems);
    let middleware = middleware::read(f, problems);

    if problems.errors.len() > errors_before {
        return None;
    }
    let served = served?;
    Some(WebApp {
        program: program?,
        routed: served.routed,
        hosts: served.hosts,
        tls: served.tls,
        requires_secure: served.requires_secure,
        port_env_vars,
        health_check_path,
        readiness_timeout,
        health_check_interval,
        health_check_failures,
        health_check_timeout,
        connection_time_bound,
        max_body: served.max_body,
        middleware: middleware?,
    })
}
