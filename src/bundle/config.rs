//! A bundle's `config/keter.yaml`, in either of the two formats of the README's "Bundles" (the
//! seed's flat format and Keter's stanza format), read into validated stanzas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::served::{self, Redirect, ReverseProxy, StaticFiles, Tls};
use crate::names::{Hostname, UrlPath, check_env_name, check_env_value};
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// Variables that keter sets itself; a bundle may not override them (an app that overrides
/// PORT breaks its own readiness check).
pub const RESERVED_ENV: [&str; 4] = ["PORT", "YESOD_PORT", "APPROOT", "YESOD_APPROOT"];

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
}

/// What to run, common to every process stanza.
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// The executable, as written: relative to `config/` (or absolute inside the bundle).
    /// Resolved and checked against the unpacked folder by `bundle::resolve_exec`.
    pub exec: PathBuf,
    pub args: Vec<String>,
    /// Stanza `env`: names valid and none of [`RESERVED_ENV`].
    pub env: BTreeMap<String, String>,
    /// Names of keter's own environment variables to pass on.
    pub forward_env: Vec<String>,
    /// Where the stanza is in the file (`stanzas[1]`, or empty for the flat format), for
    /// messages.
    pub origin: String,
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
    /// Non-empty, no duplicates; the first builds APPROOT.
    pub hosts: Vec<Hostname>,
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
    /// Overrides the global per-request bound; `Some(None)` means no bound.
    pub connection_time_bound: Option<Option<Duration>>,
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
    /// Every host of every stanza, in order.
    pub fn hosts(&self) -> impl Iterator<Item = &Hostname> {
        self.webapps
            .iter()
            .flat_map(|w| w.hosts.iter())
            .chain(self.statics.iter().flat_map(|s| s.served.hosts.iter()))
            .chain(self.redirects.iter().flat_map(|r| r.served.hosts.iter()))
            .chain(self.proxies.iter().flat_map(|p| p.served.hosts.iter()))
    }
}

/// Reads a parsed `keter.yaml`. Problems are recorded with `problems`' file name.
pub fn from_tree(tree: &Value, problems: &mut Problems) -> Option<BundleConfig> {
    let mut f = Fields::new(tree, "", problems)?;
    let mut webapps = Vec::new();
    let mut background = Vec::new();
    let mut statics = Vec::new();
    let mut redirects = Vec::new();
    let mut proxies = Vec::new();
    let mut ok = true;
    let mut postgres = false;
    // Keys of the `yesod keter` command that Yesod's scaffold puts in the same file.
    for key in ["user-edited", "copy-to", "copy-to-args", "copy-to-port"] {
        f.raw(key);
    }
    if f.contains("stanzas") {
        let stanzas = f.raw("stanzas");
        match stanzas {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match read_stanza(item, &format!("stanzas[{i}]"), problems) {
                        Some(Stanza::Web(w)) => webapps.push(w),
                        Some(Stanza::Background(b)) => background.push(b),
                        Some(Stanza::Static(st)) => statics.push(st),
                        Some(Stanza::Redirect(r)) => redirects.push(r),
                        Some(Stanza::Proxy(p)) => proxies.push(p),
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
                Some(pg) => postgres = pg,
                None => ok = false,
            }
        }
        f.finish(problems);
    } else {
        // The flat format: the top level is one webapp, plus Keter's flat extras.
        match read_webapp(&mut f, true, problems) {
            Some(w) => webapps.push(w),
            None => ok = false,
        }
        let errors_before = problems.errors.len();
        if let Some(v) = f.raw("static-hosts") {
            statics = served::read_flat_static(v, problems);
        }
        if let Some(v) = f.raw("redirects") {
            redirects = served::read_flat_redirects(v, problems);
        }
        ok &= problems.errors.len() == errors_before;
        postgres = f.bool("postgres", problems).unwrap_or(false);
        f.finish(problems);
    }
    if ok && webapps.is_empty() && statics.is_empty() && redirects.is_empty() && proxies.is_empty()
    {
        problems.error(
            "stanzas",
            "the bundle has no webapp, static-files, redirect or reverse-proxy stanza; nothing would be served",
        );
        ok = false;
    }
    let config = BundleConfig {
        webapps,
        background,
        statics,
        redirects,
        proxies,
        postgres,
    };
    if ok {
        // One host, one stanza: Nginx would pick one of them silently.
        let mut seen: Vec<&Hostname> = Vec::new();
        for h in config.hosts() {
            if seen.contains(&h) {
                problems.error("stanzas", format!("the host {h} is served by two stanzas"));
                ok = false;
            }
            seen.push(h);
        }
    }
    (ok && !problems.has_errors()).then_some(config)
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
        "static-files" => served::read_static(&mut f, problems).map(Stanza::Static),
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
            "required: the program to run, relative to config/",
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
        if RESERVED_ENV.contains(&k.as_str()) {
            problems.error(key, format!("{k} is set by keter and cannot be overridden"));
        } else if let Err(e) = check_env_name(k).and_then(|()| check_env_value(v)) {
            problems.error(key, e);
        }
    }
    let forward_env = f.strings("forward-env", problems).unwrap_or_default();
    for (i, name) in forward_env.iter().enumerate() {
        let key = format!("{}[{i}]", f.path("forward-env"));
        if RESERVED_ENV.contains(&name.as_str()) {
            problems.error(
                key,
                format!("{name} is set by keter and cannot be overridden"),
            );
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
    })
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
        if RESERVED_ENV.contains(&name.as_str()) {
            problems.error(key, format!("{name} is set by keter already"));
        } else if let Err(e) = check_env_name(name) {
            problems.error(key, e);
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
    let connection_time_bound = f
        .uint("connection-time-bound", u64::MAX, problems)
        .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)));

    if problems.errors.len() > errors_before {
        return None;
    }
    let served = served?;
    Some(WebApp {
        program: program?,
        hosts: served.hosts,
        tls: served.tls,
        requires_secure: served.requires_secure,
        port_env_vars,
        health_check_path,
        readiness_timeout,
        connection_time_bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> (Option<BundleConfig>, Problems) {
        let tree = yaml::parse(text).unwrap();
        let mut p = Problems::new("hello.keter: config/keter.yaml");
        let c = from_tree(&tree, &mut p);
        (c, p)
    }

    #[test]
    fn seed_flat_format() {
        let (c, p) = read(
            "exec: ../dist/build/yesodweb/yesodweb\nargs:\n  - production\nhost: www.yesodweb.com\nssl: false\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let w = &c.unwrap().webapps[0];
        assert_eq!(
            w.program.exec,
            PathBuf::from("../dist/build/yesodweb/yesodweb")
        );
        assert_eq!(w.program.args, vec!["production"]);
        assert_eq!(w.program.key("exec"), "exec");
        assert_eq!(w.hosts[0].as_str(), "www.yesodweb.com");
        assert_eq!(w.tls, Tls::Off);
        assert_eq!(w.health_check_path.as_str(), "/");
    }

    #[test]
    fn flat_extra_hosts_and_env() {
        let (c, p) = read(
            "exec: ../app\nhost: A.example.com\nextra-hosts: [b.example.com]\nenv: {GREETING: hi}\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let w = &c.unwrap().webapps[0];
        let hosts: Vec<&str> = w.hosts.iter().map(|h| h.as_str()).collect();
        assert_eq!(hosts, ["a.example.com", "b.example.com"]);
        assert_eq!(w.program.env["GREETING"], "hi");
    }

    #[test]
    fn stanza_format_webapp() {
        let (c, p) = read(
            "stanzas:\n  - type: webapp\n    exec: ../dist/bin/app\n    args: [production]\n    env: {KEY: value}\n    forward-env: [LANG]\n    hosts: [www.example.com, example.com]\n    health-check-path: /up\n    ensure-alive-time-bound: 5000000\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let w = &c.unwrap().webapps[0];
        assert_eq!(w.hosts.len(), 2);
        assert_eq!(w.program.forward_env, ["LANG"]);
        assert_eq!(w.program.key("exec"), "stanzas[0].exec");
        assert_eq!(w.health_check_path.as_str(), "/up");
        assert_eq!(w.readiness_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn errors_name_file_and_key() {
        let (c, p) = read(
            "stanzas:\n  - type: webapp\n    hosts: [\"evil.com;}\"]\n    env: {PORT: \"1\"}\n  - type: static-files\n    root: ../static\n  - type: teleport\n  - type: background\n    exec: ../w\n    restart-count: often\n",
        );
        assert!(c.is_none());
        let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        for expected in [
            "hello.keter: config/keter.yaml: stanzas[0].exec: required",
            "hello.keter: config/keter.yaml: stanzas[0].env.PORT: PORT is set by keter and cannot be overridden",
            "hello.keter: config/keter.yaml: stanzas[0].hosts[0]: the host name \"evil.com;}\" is not valid",
            "hello.keter: config/keter.yaml: stanzas[1].hosts: required: at least one host name",
            "hello.keter: config/keter.yaml: stanzas[3].restart-count: expected a whole number",
            "hello.keter: config/keter.yaml: stanzas[2].type: unknown stanza type \"teleport\"",
        ] {
            assert!(
                msgs.iter().any(|m| m.starts_with(expected)),
                "missing {expected:?} in {msgs:#?}"
            );
        }
    }

    #[test]
    fn missing_host_and_wrong_types() {
        let (c, p) = read("exec: 5\nargs: {a: 1}\nhost: []\n");
        assert!(c.is_none());
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"args"), "{keys:?}");
        assert!(keys.contains(&"host"), "{keys:?}");
    }

    #[test]
    fn background_stanzas() {
        let (c, p) = read(
            "stanzas:\n  - type: webapp\n    exec: ../a\n    host: a.b\n  - type: background\n    exec: ../dist/bin/worker\n    args: [--queue, q]\n    restart-count: 3\n    restart-delay-seconds: 1\n  - type: background\n    exec: ../w2\n    restart-count: unlimited\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let c = c.unwrap();
        assert_eq!(c.background.len(), 2);
        assert_eq!(c.background[0].restart_count, Some(3));
        assert_eq!(c.background[0].restart_delay, Duration::from_secs(1));
        assert_eq!(c.background[0].program.key("exec"), "stanzas[1].exec");
        assert_eq!(c.background[1].restart_count, None);
        assert_eq!(c.background[1].restart_delay, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_warn() {
        let (c, p) = read("exec: ../app\nhost: a.example.com\ncolour: blue\n");
        assert!(c.is_some());
        assert_eq!(p.warnings[0].key, "colour");
    }

    #[test]
    fn postgres_plugin_in_both_formats() {
        let (c, p) =
            read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {postgres: true}\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(c.unwrap().postgres);
        let (c, p) = read("exec: ../a\nhost: a.b\npostgres: yes\n");
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(c.unwrap().postgres);
        let (c, _) = read("exec: ../a\nhost: a.b\n");
        assert!(!c.unwrap().postgres);
        let (c, _) = read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {}\n");
        assert!(!c.unwrap().postgres);
    }

    #[test]
    fn postgres_plugin_wrong_type_is_an_error() {
        let (c, p) =
            read("stanzas: [{type: webapp, exec: ../a, host: a.b}]\nplugins: {postgres: maybe}\n");
        assert!(c.is_none());
        assert_eq!(p.errors[0].key, "plugins.postgres");
    }
}
