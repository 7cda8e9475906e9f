//! A bundle's `config/keter.yaml`, in either of the two formats of DESIGN.md section 4 (the
//! seed's flat format and Keter's stanza format), read into validated stanzas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::names::{Hostname, UrlPath, check_env_name, check_env_value};
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// Variables that keter sets itself; a bundle may not override them (an app that overrides
/// PORT breaks its own readiness check).
pub const RESERVED_ENV: [&str; 4] = ["PORT", "YESOD_PORT", "APPROOT", "YESOD_APPROOT"];

/// A bundle's validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleConfig {
    /// Processes that answer HTTP behind Nginx; at least one.
    pub webapps: Vec<WebApp>,
    /// The postgres plugin: the app gets its own role and database (DESIGN.md 8).
    pub postgres: bool,
}

/// A `webapp` stanza (or the flat format's top level).
#[derive(Debug, Clone, PartialEq)]
pub struct WebApp {
    /// The executable, as written: relative to `config/` (or absolute inside the bundle).
    /// Resolved and checked against the unpacked folder by `bundle::resolve_exec`.
    pub exec: PathBuf,
    pub args: Vec<String>,
    /// Stanza `env`: names valid and none of [`RESERVED_ENV`].
    pub env: BTreeMap<String, String>,
    /// Names of keter's own environment variables to pass on.
    pub forward_env: Vec<String>,
    /// Non-empty, no duplicates; the first builds APPROOT.
    pub hosts: Vec<Hostname>,
    /// `APPROOT` uses `https://`.
    pub ssl: bool,
    /// Requested with the first host as `Host` until it answers below 500.
    pub health_check_path: UrlPath,
    /// Overrides the global readiness timeout (Keter's `ensure-alive-time-bound`).
    pub readiness_timeout: Option<Duration>,
    /// Overrides the global per-request bound; `Some(None)` means no bound.
    pub connection_time_bound: Option<Option<Duration>>,
}

impl BundleConfig {
    /// Every host of every stanza, in order.
    pub fn hosts(&self) -> impl Iterator<Item = &Hostname> {
        self.webapps.iter().flat_map(|w| w.hosts.iter())
    }
}

/// Reads a parsed `keter.yaml`. Problems are recorded with `problems`' file name.
pub fn from_tree(tree: &Value, problems: &mut Problems) -> Option<BundleConfig> {
    let mut f = Fields::new(tree, "", problems)?;
    let mut webapps = Vec::new();
    let mut ok = true;
    let mut postgres = false;
    if f.contains("stanzas") {
        let stanzas = f.raw("stanzas");
        match stanzas {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match read_stanza(item, &format!("stanzas[{i}]"), problems) {
                        Some(Some(w)) => webapps.push(w),
                        Some(None) => {}
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
        for key in ["static-hosts", "redirects"] {
            if let Some(v) = f.raw(key)
                && !matches!(v, Value::Array(a) if a.is_empty())
            {
                problems.error(key, "not supported by this version of keter yet");
                ok = false;
            }
        }
        postgres = f.bool("postgres", problems).unwrap_or(false);
        f.finish(problems);
    }
    if ok && webapps.is_empty() {
        problems.error(
            "stanzas",
            "the bundle has no webapp stanza; nothing would be served",
        );
        ok = false;
    }
    if ok {
        let mut seen: BTreeMap<&Hostname, usize> = BTreeMap::new();
        for (i, w) in webapps.iter().enumerate() {
            for h in &w.hosts {
                if let Some(j) = seen.insert(h, i)
                    && j != i
                {
                    problems.error(
                        format!("stanzas[{i}].hosts"),
                        format!("the host {h} is also served by stanza {j}"),
                    );
                    ok = false;
                }
            }
        }
    }
    (ok && !problems.has_errors()).then_some(BundleConfig { webapps, postgres })
}

/// One stanza: `Some(Some(webapp))`, `Some(None)` for a stanza that adds nothing, `None` on error.
fn read_stanza(v: &Value, path: &str, problems: &mut Problems) -> Option<Option<WebApp>> {
    let mut f = Fields::new(v, path, problems)?;
    let Some(kind) = f.string("type", problems) else {
        problems.error(
            f.path("type"),
            "required: one of webapp, static-files, redirect, reverse-proxy, background",
        );
        return None;
    };
    match kind.as_str() {
        "webapp" => {
            let w = read_webapp(&mut f, false, problems);
            f.finish(problems);
            w.map(Some)
        }
        "static-files" | "redirect" | "reverse-proxy" | "background" => {
            problems.error(
                f.path("type"),
                format!("stanza type {kind:?} is not supported by this version of keter yet; the bundle is refused rather than served without it"),
            );
            None
        }
        other => {
            problems.error(
                f.path("type"),
                format!("unknown stanza type {other:?}; expected one of webapp, static-files, redirect, reverse-proxy, background"),
            );
            None
        }
    }
}

/// The `plugins` mapping: whether the app asks for a database; `None` on error.
fn read_plugins(v: &Value, problems: &mut Problems) -> Option<bool> {
    let mut f = Fields::new(v, "plugins", problems)?;
    let errors_before = problems.errors.len();
    let postgres = f.bool("postgres", problems).unwrap_or(false);
    f.finish(problems);
    (problems.errors.len() == errors_before).then_some(postgres)
}

/// The keys of a webapp. `flat` is the seed's format (hosts in `host` + `extra-hosts`).
fn read_webapp(f: &mut Fields, flat: bool, problems: &mut Problems) -> Option<WebApp> {
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

    // The flat format names extra hosts `extra-hosts`; stanzas use `hosts`. Both accept `host`.
    let extra_key = if flat { "extra-hosts" } else { "hosts" };
    let mut host_texts: Vec<(String, String)> = Vec::new();
    if let Some(list) = f.strings("host", problems) {
        host_texts.extend(list.into_iter().map(|h| (f.path("host"), h)));
    }
    if let Some(list) = f.strings(extra_key, problems) {
        let key = f.path(extra_key);
        host_texts.extend(
            list.into_iter()
                .enumerate()
                .map(|(i, h)| (format!("{key}[{i}]"), h)),
        );
    }
    let mut hosts: Vec<Hostname> = Vec::new();
    for (key, text) in host_texts {
        match Hostname::new(&text) {
            Ok(h) if hosts.contains(&h) => {
                problems.warn(key, format!("the host {h} is listed twice"))
            }
            Ok(h) => hosts.push(h),
            Err(e) => problems.error(key, e),
        }
    }
    if hosts.is_empty()
        && !problems.errors[errors_before..]
            .iter()
            .any(|e| e.key.contains("host"))
    {
        problems.error(
            f.path(if flat { "host" } else { "hosts" }),
            "required: at least one host name that Nginx routes to this app",
        );
    }

    let ssl = match f.raw("ssl") {
        None => false,
        Some(Value::Object(_)) => {
            problems.error(
                f.path("ssl"),
                "per-app certificates are not supported by this version of keter yet",
            );
            false
        }
        Some(_) => f.bool("ssl", problems).unwrap_or(false),
    };
    if f.bool("requires-secure", problems) == Some(true) {
        problems.error(
            f.path("requires-secure"),
            "not supported by this version of keter yet (no TLS listeners)",
        );
    }
    if f.raw("port-env-vars").is_some() {
        problems.error(
            f.path("port-env-vars"),
            "not supported by this version of keter yet",
        );
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
    Some(WebApp {
        exec: PathBuf::from(exec?),
        args,
        env,
        forward_env,
        hosts,
        ssl,
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
        assert_eq!(w.exec, PathBuf::from("../dist/build/yesodweb/yesodweb"));
        assert_eq!(w.args, vec!["production"]);
        assert_eq!(w.hosts[0].as_str(), "www.yesodweb.com");
        assert!(!w.ssl);
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
        assert_eq!(w.env["GREETING"], "hi");
    }

    #[test]
    fn stanza_format_webapp() {
        let (c, p) = read(
            "stanzas:\n  - type: webapp\n    exec: ../dist/bin/app\n    args: [production]\n    env: {KEY: value}\n    forward-env: [LANG]\n    hosts: [www.example.com, example.com]\n    health-check-path: /up\n    ensure-alive-time-bound: 5000000\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let w = &c.unwrap().webapps[0];
        assert_eq!(w.hosts.len(), 2);
        assert_eq!(w.forward_env, ["LANG"]);
        assert_eq!(w.health_check_path.as_str(), "/up");
        assert_eq!(w.readiness_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn errors_name_file_and_key() {
        let (c, p) = read(
            "stanzas:\n  - type: webapp\n    hosts: [\"evil.com;}\"]\n    env: {PORT: \"1\"}\n  - type: static-files\n    root: ../static\n  - type: teleport\n",
        );
        assert!(c.is_none());
        let msgs: Vec<String> = p.errors.iter().map(|e| e.to_string()).collect();
        for expected in [
            "hello.keter: config/keter.yaml: stanzas[0].exec: required",
            "hello.keter: config/keter.yaml: stanzas[0].env.PORT: PORT is set by keter and cannot be overridden",
            "hello.keter: config/keter.yaml: stanzas[0].hosts[0]: the host name \"evil.com;}\" is not valid",
            "hello.keter: config/keter.yaml: stanzas[1].type: stanza type \"static-files\" is not supported",
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
