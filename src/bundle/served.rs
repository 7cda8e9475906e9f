//! The stanzas Nginx serves by itself, without an app process: `static-files`, `redirect`
//! and `reverse-proxy` (and the flat format's `static-hosts` and `redirects`), plus the keys
//! every host-serving stanza shares: `host`/`hosts`, `ssl`, `requires-secure` and keter's
//! `client-max-body-size`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::middleware::{self, Middlewares};
use crate::names::{Host, Hostname, RedirectUrl, UrlPath};
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// How a stanza's hosts are served over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tls {
    /// `ssl: false` (or absent): the listeners' certificates; `APPROOT` is `http://`.
    #[default]
    Off,
    /// `ssl: true`: the TLS listeners' certificates; `APPROOT` is `https://`.
    Listener,
    /// `ssl: {key, certificate, chain-certificates}`: as written, relative to `config/` (inside
    /// the bundle) or absolute (on the host); made absolute when the bundle is checked
    /// (`bundle::check_config`), and copied into keter's own folder at deploy.
    Own {
        key: PathBuf,
        certificate: PathBuf,
        chain: Vec<PathBuf>,
    },
    /// `ssl: acme`: keter obtains and renews one certificate for the stanza's hosts over ACME
    /// (`src/acme/`, `docs/acme.md`); until it exists the hosts are served over plain HTTP
    /// only. Needs the global `acme` section; wildcard hosts are refused.
    Acme,
}

/// The keys shared by every stanza that Nginx routes hosts to.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// Non-empty, no duplicates.
    pub hosts: Vec<Host>,
    /// The hosts Nginx routes to this stanza: `hosts` less those another stanza of the bundle
    /// serves (Keter's rule, see `config::route_hosts`).
    pub routed: Vec<Host>,
    pub tls: Tls,
    /// Plain HTTP requests get a 301 to HTTPS.
    pub requires_secure: bool,
    /// keter's `client-max-body-size` for this stanza; `None` for the global one.
    pub max_body: Option<u64>,
    /// Where the stanza is in the file (`stanzas[2]`, `static-hosts[0]`), for messages.
    pub origin: String,
}

impl Served {
    /// The key path of one of this stanza's keys.
    pub fn key(&self, key: &str) -> String {
        join_key(&self.origin, key)
    }
}

/// `stanzas[1].root` from a stanza's origin and a key.
pub fn join_key(origin: &str, key: &str) -> String {
    if origin.is_empty() {
        key.to_string()
    } else {
        format!("{origin}.{key}")
    }
}

/// `static-files`: Nginx serves a folder.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticFiles {
    pub served: Served,
    /// As written, relative to `config/`; `bundle::check_config` makes it the absolute folder
    /// it resolves to, inside the bundle or under an `allowed-static-roots` folder.
    pub root: PathBuf,
    /// The folder that holds `root` and that the app cannot replace: the unpacked bundle (in
    /// keter's `temp/`), or the `allowed-static-roots` folder the root is in. Set with `root`
    /// by `bundle::check_config`; Nginx checks every symlink below it (README, "Generated
    /// Nginx files").
    pub base: Option<PathBuf>,
    pub directory_listing: bool,
    pub middleware: Middlewares,
    /// Keter's `connection-time-bound` (ms) of this stanza; `Some(None)` for none.
    pub time_bound: Option<Option<Duration>>,
}

/// `redirect`: Nginx answers with a redirect.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub served: Served,
    /// 301, 302, 303 (Keter's default), 307 or 308.
    pub status: u16,
    pub actions: Vec<RedirectAction>,
}

/// One of a redirect's `actions`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedirectAction {
    /// Only requests for this exact path; `None` for every path.
    pub path: Option<UrlPath>,
    pub target: RedirectTo,
}

/// Where a redirect action sends the client.
#[derive(Debug, Clone, PartialEq)]
pub enum RedirectTo {
    Url(RedirectUrl),
    /// The same path on another host, written as given (Keter keeps its case).
    Host {
        host: Host,
        secure: bool,
        port: Option<u16>,
    },
}

/// `reverse-proxy`: Nginx forwards `reversing-host` to another server.
#[derive(Debug, Clone, PartialEq)]
pub struct ReverseProxy {
    pub served: Served,
    /// A host name or IP address (validated).
    pub reversed_host: String,
    pub reversed_port: u16,
    /// Talk HTTPS to the reversed server.
    pub reversed_ssl: bool,
    /// Pass the client's `Host` instead of `reversed-host`.
    pub preserve_host: bool,
    /// Per-request bound: the smaller of Keter's `timeout` (µs) and `connection-time-bound`
    /// (ms); `Some(None)` for none, `None` for the global one.
    pub timeout: Option<Option<Duration>>,
    pub middleware: Middlewares,
}

/// Reads `host`/`hosts` (and `extra_key`, e.g. the flat format's `extra-hosts`), `ssl`,
/// `requires-secure` and `client-max-body-size`. `None` (with problems recorded) when a host
/// is invalid or none is given.
pub fn read_served(
    f: &mut Fields,
    extra_key: &'static str,
    problems: &mut Problems,
) -> Option<Served> {
    let errors_before = problems.errors.len();
    let mut texts: Vec<(String, String)> = Vec::new();
    let single = f.names("host", problems);
    let has_single = single.is_some();
    if let Some(list) = single {
        texts.extend(list.into_iter().map(|h| (f.path("host"), h)));
    }
    if let Some(list) = f.names(extra_key, problems) {
        let key = f.path(extra_key);
        if has_single && extra_key == "hosts" {
            // Keter reads one of the two keys (a webapp's `host`, the other stanzas' `hosts`)
            // and ignores the other; serving both is the only reading that loses nothing.
            problems.warn(
                &key,
                "both `host` and `hosts` are given: Keter reads only one of them; keter serves the hosts of both",
            );
        }
        texts.extend(
            list.into_iter()
                .enumerate()
                .map(|(i, h)| (format!("{key}[{i}]"), h)),
        );
    }
    let hosts = hosts_from(texts, problems);
    if hosts.is_empty() && problems.errors.len() == errors_before {
        // The flat format's main key is `host`; stanzas list `hosts`.
        let key = if extra_key == "hosts" {
            "hosts"
        } else {
            "host"
        };
        problems.error(
            f.path(key),
            "required: at least one host name that Nginx routes to this stanza",
        );
    }
    let tls = read_tls(f, problems);
    let requires_secure = f.bool("requires-secure", problems).unwrap_or(false);
    let max_body = f.size("client-max-body-size", problems);
    (problems.errors.len() == errors_before).then(|| Served {
        routed: hosts.clone(),
        hosts,
        tls,
        requires_secure,
        max_body,
        origin: f.path("").trim_end_matches('.').to_string(),
    })
}

fn hosts_from(texts: Vec<(String, String)>, problems: &mut Problems) -> Vec<Host> {
    let mut hosts: Vec<Host> = Vec::new();
    for (key, text) in texts {
        match Host::new(&text) {
            Ok(h) if hosts.contains(&h) => {
                problems.warn(key, format!("the host {h} is listed twice"))
            }
            Ok(h) => hosts.push(h),
            Err(e) => problems.error(key, e),
        }
    }
    hosts
}

fn read_tls(f: &mut Fields, problems: &mut Problems) -> Tls {
    match f.raw("ssl") {
        None => Tls::Off,
        Some(v @ Value::Object(_)) => {
            let path = f.path("ssl");
            let Some(mut t) = Fields::new(v, &path, problems) else {
                return Tls::Off;
            };
            let key = t.string("key", problems);
            let certificate = t.string("certificate", problems);
            let chain = t
                .strings("chain-certificates", problems)
                .unwrap_or_default();
            t.finish(problems);
            match (key, certificate) {
                (Some(key), Some(certificate)) => Tls::Own {
                    key: key.into(),
                    certificate: certificate.into(),
                    chain: chain.into_iter().map(PathBuf::from).collect(),
                },
                _ => {
                    problems.error(
                        path,
                        "a certificate needs `key` and `certificate` (files relative to config/, or absolute paths on the host)",
                    );
                    Tls::Off
                }
            }
        }
        Some(Value::String(s)) if s == "acme" => Tls::Acme,
        Some(_) => match f.bool("ssl", problems) {
            Some(true) => Tls::Listener,
            _ => Tls::Off,
        },
    }
}

/// Keter's `connection-time-bound` in milliseconds; `Some(None)` for 0 (none).
pub fn read_time_bound(f: &mut Fields, problems: &mut Problems) -> Option<Option<Duration>> {
    f.uint("connection-time-bound", u64::MAX, problems)
        .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))
}

/// A `static-files` stanza (`listing` is the default of `directory-listing`: off for stanzas,
/// on for the flat format's `static-hosts`, as Keter's conversion sets it).
pub fn read_static(f: &mut Fields, listing: bool, problems: &mut Problems) -> Option<StaticFiles> {
    let served = read_served(f, "hosts", problems);
    let root = f.string("root", problems);
    if root.is_none() && !problems.errors.iter().any(|e| e.key == f.path("root")) {
        problems.error(
            f.path("root"),
            "required: the folder to serve, relative to config/",
        );
    }
    let directory_listing = f.bool("directory-listing", problems).unwrap_or(listing);
    let middleware = middleware::read(f, problems);
    let time_bound = read_time_bound(f, problems);
    Some(StaticFiles {
        served: served?,
        root: PathBuf::from(root?),
        base: None,
        directory_listing,
        middleware: middleware?,
        time_bound,
    })
}

/// A `redirect` stanza.
pub fn read_redirect(f: &mut Fields, problems: &mut Problems) -> Option<Redirect> {
    let errors_before = problems.errors.len();
    let served = read_served(f, "hosts", problems);
    let status = match f.uint("status", 999, problems) {
        None => 303,
        Some(s @ (301 | 302 | 303 | 307 | 308)) => s as u16,
        Some(other) => {
            problems.error(
                f.path("status"),
                format!("{other} is not a redirect status; expected 301, 302, 303, 307 or 308"),
            );
            303
        }
    };
    let mut actions = Vec::new();
    match f.raw("actions") {
        Some(Value::Array(items)) if !items.is_empty() => {
            let base = f.path("actions");
            for (i, item) in items.iter().enumerate() {
                if let Some(a) = read_action(item, &format!("{base}[{i}]"), problems) {
                    actions.push(a);
                }
            }
        }
        other => problems.error(
            f.path("actions"),
            format!(
                "required: a list of actions such as [{{host: www.example.com}}] or [{{url: \"https://...\"}}], found {}",
                other.map_or("nothing", yaml::type_name)
            ),
        ),
    }
    (problems.errors.len() == errors_before).then_some(Redirect {
        served: served?,
        status,
        actions,
    })
}

/// A redirect's target host: any host name, with a port, but no wildcard.
fn target_host(text: &str, key: &str, problems: &mut Problems) -> Option<Host> {
    match Host::new(text) {
        Ok(h) if h.name.is_wildcard() => {
            problems.error(key, "a redirect target cannot be a wildcard");
            None
        }
        Ok(h) => Some(h),
        Err(e) => {
            problems.error(key, e);
            None
        }
    }
}

fn read_action(v: &Value, path: &str, problems: &mut Problems) -> Option<RedirectAction> {
    let errors_before = problems.errors.len();
    let mut f = Fields::new(v, path, problems)?;
    let source = f.string("path", problems).and_then(|p| {
        UrlPath::new(&p)
            .map_err(|e| problems.error(format!("{path}.path"), e))
            .ok()
    });
    let url = f.string("url", problems);
    let host = f.string("host", problems);
    let secure = f.bool("secure", problems).unwrap_or(false);
    let port = f.uint("port", 65535, problems).map(|p| p as u16);
    f.finish(problems);
    let target = match (url, host) {
        (Some(url), None) => RedirectUrl::new(&url)
            .map(RedirectTo::Url)
            .map_err(|e| problems.error(format!("{path}.url"), e))
            .ok(),
        (None, Some(host)) => match target_host(&host, &format!("{path}.host"), problems) {
            Some(h) if h.port.is_some() && port.is_some() => {
                problems.error(
                    path,
                    "give the port either in `host` or in `port`, not both",
                );
                None
            }
            Some(host) => Some(RedirectTo::Host { host, secure, port }),
            None => None,
        },
        _ => {
            problems.error(path, "an action needs either `host` or `url`");
            None
        }
    };
    if problems.errors.len() > errors_before {
        return None;
    }
    Some(RedirectAction {
        path: source,
        target: target?,
    })
}

/// A `reverse-proxy` stanza.
pub fn read_reverse_proxy(f: &mut Fields, problems: &mut Problems) -> Option<ReverseProxy> {
    let errors_before = problems.errors.len();
    // Keter names the incoming host `reversing-host`.
    let hosts = f
        .names("reversing-host", problems)
        .map(|list| {
            let key = f.path("reversing-host");
            hosts_from(
                list.into_iter().map(|h| (key.clone(), h)).collect(),
                problems,
            )
        })
        .unwrap_or_default();
    if hosts.is_empty() && problems.errors.len() == errors_before {
        problems.error(
            f.path("reversing-host"),
            "required: the host name Nginx forwards",
        );
    }
    let tls = read_tls(f, problems);
    let requires_secure = f.bool("requires-secure", problems).unwrap_or(false);
    let max_body = f.size("client-max-body-size", problems);
    let reversed_host = match f.string("reversed-host", problems) {
        Some(h) if h.parse::<IpAddr>().is_ok() => Some(h),
        Some(h) => match Hostname::new(&h) {
            Ok(n) if !n.is_wildcard() => Some(n.to_string()),
            Ok(_) => {
                problems.error(f.path("reversed-host"), "cannot be a wildcard");
                None
            }
            Err(e) => {
                problems.error(f.path("reversed-host"), e);
                None
            }
        },
        None => {
            problems.error(
                f.path("reversed-host"),
                "required: the host name or IP address to forward to",
            );
            None
        }
    };
    let reversed_port = match f.uint("reversed-port", 65535, problems) {
        Some(0) | None => {
            problems.error(f.path("reversed-port"), "required: a port from 1 to 65535");
            None
        }
        Some(p) => Some(p as u16),
    };
    let reversed_ssl = f.bool("reversed-ssl", problems).unwrap_or(false);
    let preserve_host = f.bool("preserve-host", problems).unwrap_or(false);
    // Keter's `timeout` is the response timeout of its HTTP client, in microseconds.
    let timeout = match f.uint("timeout", u64::MAX, problems) {
        Some(0) => Some(None),
        Some(us) if us < 1000 => {
            problems.error(
                f.path("timeout"),
                format!(
                    "{us} is microseconds, as in Keter: every request would time out; write {} for {us} s",
                    us * 1_000_000
                ),
            );
            None
        }
        Some(us) => Some(Some(Duration::from_micros(us))),
        None => None,
    };
    let time_bound = read_time_bound(f, problems);
    let middleware = middleware::read(f, problems);
    for key in ["rewrite-request", "rewrite-response"] {
        if f.raw(key).is_some() {
            problems.error(
                f.path(key),
                "header rewriting is not supported; set headers in the reversed server",
            );
        }
    }
    if problems.errors.len() > errors_before {
        return None;
    }
    // Both bound the request: the smaller one applies; "none" only when neither bounds it.
    let timeout = match (timeout, time_bound) {
        (Some(Some(a)), Some(Some(b))) => Some(Some(a.min(b))),
        (Some(Some(a)), _) | (_, Some(Some(a))) => Some(Some(a)),
        (Some(None), _) | (_, Some(None)) => Some(None),
        (None, None) => None,
    };
    Some(ReverseProxy {
        served: Served {
            routed: hosts.clone(),
            hosts,
            tls,
            requires_secure,
            max_body,
            origin: f.path("").trim_end_matches('.').to_string(),
        },
        reversed_host: reversed_host?,
        reversed_port: reversed_port?,
        reversed_ssl,
        preserve_host,
        timeout,
        middleware: middleware?,
    })
}

/// The flat format's `static-hosts: [{host, root}]`, listing directories as Keter's
/// conversion does.
pub fn read_flat_static(v: &Value, problems: &mut Problems) -> Vec<StaticFiles> {
    let mut out = Vec::new();
    let Value::Array(items) = v else {
        problems.error("static-hosts", "expected a list of {host, root}");
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("static-hosts[{i}]");
        if let Some(mut f) = Fields::new(item, &path, problems) {
            if let Some(s) = read_static(&mut f, true, problems) {
                out.push(s);
            }
            f.finish(problems);
        }
    }
    out
}

/// The flat format's `redirects: [{from, to}]`: permanent redirects to the same path on
/// another host, as Keter converts them.
pub fn read_flat_redirects(v: &Value, problems: &mut Problems) -> Vec<Redirect> {
    let mut out = Vec::new();
    let Value::Array(items) = v else {
        problems.error("redirects", "expected a list of {from, to}");
        return out;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("redirects[{i}]");
        let Some(mut f) = Fields::new(item, &path, problems) else {
            continue;
        };
        let from = f.names("from", problems);
        let to = f.names("to", problems);
        f.finish(problems);
        let (Some([from]), Some([to])) = (from.as_deref(), to.as_deref()) else {
            problems.error(path, "needs `from` and `to`, one host name each");
            continue;
        };
        let from = Host::new(from).map_err(|e| problems.error(format!("{path}.from"), e));
        let to = target_host(to, &format!("{path}.to"), problems);
        if let (Ok(from), Some(to)) = (from, to) {
            out.push(Redirect {
                served: Served {
                    routed: vec![from.clone()],
                    hosts: vec![from],
                    tls: Tls::Off,
                    requires_secure: false,
                    max_body: None,
                    origin: path,
                },
                status: 301,
                actions: vec![RedirectAction {
                    path: None,
                    target: RedirectTo::Host {
                        host: to,
                        secure: false,
                        port: None,
                    },
                }],
            });
        }
    }
    out
}
