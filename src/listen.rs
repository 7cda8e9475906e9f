//! The global `listeners` (and Keter's older flat `host`, `port`, `ssl`): where Nginx listens
//! for requests, read in Keter's forms and turned into validated `listen` addresses.
//!
//! A listener's `host` is Warp's host preference, as Keter passes it to Warp: `*` and `*6`
//! listen on every IPv4 and IPv6 address (Warp binds one IPv6 socket that also takes IPv4;
//! Nginx gets the two addresses), `*4` and `!4` on every IPv4 address, `!6` on every IPv6
//! address only, an IP address on that address, and a host name on every address it resolves
//! to when keter starts.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::normalize;
use crate::problem::Problems;
use crate::yaml::{self, Fields};

/// One front-end listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub bind: Bind,
    pub port: u16,
    pub tls: Option<TlsFiles>,
    /// `tls: true` without `key` and `certificate`: a TLS listener with no certificate of its
    /// own. It serves the stanzas that bring one (`ssl: {key, certificate}`, or `ssl: acme`
    /// once obtained); every other name gets its handshake rejected.
    pub tls_without_certificate: bool,
    /// Keter's `session: true`: TLS sessions are resumed from a cache shared by Nginx's
    /// workers (Keter's TLS session manager). Without it Nginx's defaults apply.
    pub session: bool,
}

/// The addresses of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// Every IPv4 address.
    AnyV4,
    /// Every IPv6 address only.
    AnyV6,
    /// Every IPv4 and every IPv6 address.
    Any,
    /// These addresses (one IP, or what a host name resolved to).
    Ips(Vec<IpAddr>),
}

impl Listener {
    /// Nginx speaks TLS on it (with or without a certificate of its own).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some() || self.tls_without_certificate
    }

    /// The address parts of Nginx `listen` directives: `80`, `[::]:80`, `127.0.0.1:80`.
    pub fn nginx_addresses(&self) -> Vec<String> {
        let port = self.port;
        let ip = |ip: &IpAddr| match ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        };
        match &self.bind {
            Bind::AnyV4 => vec![port.to_string()],
            Bind::AnyV6 => vec![format!("[::]:{port}")],
            Bind::Any => vec![port.to_string(), format!("[::]:{port}")],
            Bind::Ips(ips) => ips.iter().map(ip).collect(),
        }
    }
}

/// Certificate files of a TLS listener (absolute, validated paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub key: PathBuf,
    pub certificate: PathBuf,
    pub chain_certificates: Vec<PathBuf>,
}

/// `listeners`, then Keter's flat `host`/`port` and `ssl`. Without any, one listener on every
/// address, port 80.
pub fn read_listeners(
    f: &mut Fields,
    base: &Path,
    problems: &mut Problems,
) -> Option<Vec<Listener>> {
    let mut out = Vec::new();
    let mut ok = true;
    if let Some(v) = f.raw("listeners") {
        match v {
            Value::Array(items) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    match read_listener(item, &format!("listeners[{i}]"), base, problems) {
                        Some(l) => out.push(l),
                        None => ok = false,
                    }
                }
            }
            Value::Object(_) => match read_listener(v, "listeners", base, problems) {
                Some(l) => out.push(l),
                None => ok = false,
            },
            other => {
                problems.error(
                    "listeners",
                    format!(
                        "expected a non-empty list of listeners, found {}",
                        yaml::type_name(other)
                    ),
                );
                ok = false;
            }
        }
    }
    // Keter's older flat form: `host`/`port` for plain HTTP and `ssl: {host, port, key,
    // certificate, session}` for TLS; converted to listeners as Keter does.
    let flat_host = f.string("host", problems);
    let flat_port = f.uint("port", 65535, problems);
    if flat_host.is_some() || flat_port.is_some() {
        let host = flat_host.unwrap_or_else(|| "*".into());
        match (bind(&host, problems, "host"), flat_port) {
            (_, Some(0)) => {
                problems.error("port", "port 0 cannot be listened on");
                ok = false;
            }
            (Some(bind), port) => out.push(Listener {
                bind,
                port: port.unwrap_or(80) as u16,
                tls: None,
                tls_without_certificate: false,
                session: false,
            }),
            (None, _) => ok = false,
        }
    }
    if let Some(v) = f.raw("ssl") {
        match read_listener(v, "ssl", base, problems) {
            Some(mut l) if l.tls.is_some() => {
                if !matches!(v.get("port"), Some(p) if !p.is_null()) {
                    l.port = 443;
                }
                out.push(l)
            }
            Some(_) => {
                problems.error("ssl", "a TLS listener needs `key` and `certificate`");
                ok = false;
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    if out.is_empty() {
        out.push(Listener {
            bind: any(problems, "listeners"),
            port: 80,
            tls: None,
            tls_without_certificate: false,
            session: false,
        });
    }
    Some(out)
}

/// Every IPv4 and IPv6 address, or every IPv4 address (with a warning) on a host whose kernel
/// has no IPv6, where Nginx could not listen on `[::]`.
fn any(problems: &mut Problems, key: &str) -> Bind {
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        Bind::Any
    } else {
        problems.warn(
            key,
            "this host has no IPv6: Nginx listens on every IPv4 address only",
        );
        Bind::AnyV4
    }
}

/// A listener's `host` in Warp's forms.
fn bind(host: &str, problems: &mut Problems, key: &str) -> Option<Bind> {
    match host {
        "*" | "*6" => return Some(any(problems, key)),
        "*4" | "!4" => return Some(Bind::AnyV4),
        "!6" => return Some(Bind::AnyV6),
        _ => {}
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Some(Bind::Ips(vec![ip]));
    }
    if crate::names::Hostname::new(host).is_err() || host.contains('*') {
        problems.error(
            key,
            format!(
                "expected \"*\", \"*4\", \"!4\", \"*6\", \"!6\", an IP address or a host name, found {host:?}"
            ),
        );
        return None;
    }
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            if ips.is_empty() {
                problems.error(
                    key,
                    format!("the host name {host:?} resolves to no address"),
                );
                return None;
            }
            Some(Bind::Ips(ips))
        }
        Err(e) => {
            problems.error(key, format!("cannot resolve the host name {host:?}: {e}"));
            None
        }
    }
}

fn read_listener(v: &Value, path: &str, base: &Path, problems: &mut Problems) -> Option<Listener> {
    let mut f = Fields::new(v, path, problems)?;
    let host = f.string("host", problems).unwrap_or_else(|| "*".into());
    let bind = bind(&host, problems, &f.path("host"));
    let key = f.string("key", problems);
    let certificate = f.string("certificate", problems);
    let chain = f
        .strings("chain-certificates", problems)
        .unwrap_or_default();
    let session = f.bool("session", problems).unwrap_or(false);
    // Only in `listeners`: Keter's flat `ssl` is a TLS listener by itself.
    let tls_flag = if path == "ssl" {
        None
    } else {
        f.bool("tls", problems)
    };
    let port = f.uint("port", 65535, problems);
    let mut ok = bind.is_some();
    let mut file = |key_name: &'static str, value: String| -> Option<PathBuf> {
        let p = normalize(&base.join(&value));
        match crate::names::check_conf_path(&p) {
            Ok(()) => Some(p),
            Err(e) => {
                problems.error(format!("{path}.{key_name}"), e);
                None
            }
        }
    };
    let tls = match (key, certificate) {
        (Some(k), Some(c)) => {
            let key = file("key", k);
            let certificate = file("certificate", c);
            let chain: Vec<Option<PathBuf>> = chain
                .into_iter()
                .map(|c| file("chain-certificates", c))
                .collect();
            match (key, certificate, chain.iter().all(Option::is_some)) {
                (Some(key), Some(certificate), true) => Some(TlsFiles {
                    key,
                    certificate,
                    chain_certificates: chain.into_iter().flatten().collect(),
                }),
                _ => {
                    ok = false;
                    None
                }
            }
        }
        (None, None) => None,
        _ => {
            problems.error(path, "`key` and `certificate` go together");
            ok = false;
            None
        }
    };
    let tls_without_certificate = match tls_flag {
        Some(true) => tls.is_none(),
        Some(false) if tls.is_some() => {
            problems.error(
                f.path("tls"),
                "tls: false beside `key` and `certificate`: a listener with a certificate speaks TLS",
            );
            ok = false;
            false
        }
        _ => false,
    };
    let is_tls = tls.is_some() || tls_without_certificate;
    if session && !is_tls {
        problems.warn(
            f.path("session"),
            "session resumption applies to TLS listeners only; this one has no certificate",
        );
    }
    let port = match port {
        Some(0) => {
            problems.error(f.path("port"), "port 0 cannot be listened on");
            ok = false;
            0
        }
        Some(p) => p as u16,
        None if is_tls => 443,
        None => 80,
    };
    f.finish(problems);
    ok.then(|| Listener {
        bind: bind.expect("checked above"),
        port,
        session: session && is_tls,
        tls,
        tls_without_certificate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listeners(text: &str) -> (Option<Vec<Listener>>, Problems) {
        let tree = yaml::parse(text).unwrap();
        let mut p = Problems::new("keter-config.yaml");
        let mut f = Fields::new(&tree, "", &mut p).unwrap();
        let l = read_listeners(&mut f, Path::new("/etc/keter"), &mut p);
        (l, p)
    }

    #[test]
    fn warps_host_forms() {
        let (l, p) = listeners(
            "listeners:\n  - {host: \"*4\", port: 80}\n  - {host: \"!4\", port: 81}\n  - {host: \"!6\", port: 82}\n  - {host: 127.0.0.1, port: 83}\n  - {host: \"::1\", port: 84}\n  - {host: localhost, port: 85}\n",
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let l = l.unwrap();
        let addrs: Vec<Vec<String>> = l.iter().map(Listener::nginx_addresses).collect();
        assert_eq!(addrs[0], ["80"]);
        assert_eq!(addrs[1], ["81"]);
        assert_eq!(addrs[2], ["[::]:82"]);
        assert_eq!(addrs[3], ["127.0.0.1:83"]);
        assert_eq!(addrs[4], ["[::1]:84"]);
        assert!(
            addrs[5].contains(&"127.0.0.1:85".to_string()),
            "{:?}",
            addrs[5]
        );
        let (l, _) = listeners("listeners: [{host: \"*6\"}]\n");
        let dual = l.unwrap()[0].nginx_addresses();
        assert!(dual == ["80", "[::]:80"] || dual == ["80"], "{dual:?}");
        let (_, p) =
            listeners("listeners: [{host: \"*.example.com\"}, {host: \"no-such-host.invalid\"}]\n");
        let keys: Vec<&str> = p.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["listeners[0].host", "listeners[1].host"],
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn session_on_tls_listeners() {
        let (l, p) = listeners(
            "listeners:\n  - {host: \"*4\", key: key.pem, certificate: certificate.pem, session: true}\nssl: {host: 127.0.0.1, key: /k, certificate: /c, session: yes}\n",
        );
        assert!(
            p.errors.is_empty() && p.warnings.is_empty(),
            "{:?} {:?}",
            p.errors,
            p.warnings
        );
        let l = l.unwrap();
        assert!(l[0].session && l[1].session);
        assert_eq!(
            l[0].tls.as_ref().unwrap().key,
            PathBuf::from("/etc/keter/key.pem")
        );
        let (_, p) = listeners("listeners: [{port: 80, session: true}]\n");
        assert_eq!(p.warnings[0].key, "listeners[0].session");
    }

    #[test]
    fn a_tls_listener_without_a_certificate_of_its_own() {
        let (l, p) = listeners(
            "listeners:\n  - {host: \"*4\", tls: true, session: true}\n  - {host: \"*4\", port: 8080, tls: false}\n",
        );
        assert!(
            p.errors.is_empty() && p.warnings.is_empty(),
            "{:?}",
            p.errors
        );
        let l = l.unwrap();
        assert!(l[0].is_tls() && l[0].tls.is_none() && l[0].tls_without_certificate);
        assert_eq!((l[0].port, l[0].session), (443, true));
        assert!(!l[1].is_tls());
        let (_, p) = listeners("listeners: [{tls: false, key: /k, certificate: /c}]\n");
        assert_eq!(p.errors[0].key, "listeners[0].tls");
    }
}
