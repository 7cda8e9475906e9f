//! Bundles: the `NAME.keter` files an operator copies into `incoming/`.
//!
//! [`unpack`] turns the file into a fresh folder (safely, as the README's "How a deploy
//! works" says); [`config`] reads its `config/keter.yaml`; [`check_config`] reads it and
//! checks it against the unpacked folder and the host: the one validation that `keter check`,
//! `keter render`, `keter bundle` and a deploy share, so that they give the same verdict.

pub mod certs;
pub mod config;
#[cfg(test)]
mod config_tests;
pub mod env;
pub mod middleware;
pub mod pack;
pub mod rate_limit;
pub mod served;
pub mod unpack;

use std::net::{IpAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

pub use config::{Background, BundleConfig, Program, WebApp};
pub use served::{Redirect, RedirectAction, RedirectTo, ReverseProxy, StaticFiles, Tls};
pub use unpack::{
    NotABundle, Op, Progress, UnpackError, Unpacked, log_progress, unpack, unpack_with_progress,
};

use crate::problem::{Invalid, Problems};
use crate::yaml;

/// What a bundle is checked against besides its own files.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The global `allowed-static-roots`: folders outside bundles that a static-files root
    /// may be in (absolute, symlinks resolved).
    pub allowed_static_roots: Vec<PathBuf>,
    /// Check what lives on the host (absolute `exec`, certificates and static roots outside
    /// the bundle). `keter bundle` packs on a build machine and leaves them to the host.
    pub host: bool,
    /// The global configuration has an `acme` section, which `ssl: acme` needs (checked only
    /// with `host`).
    pub acme: bool,
    /// Whose rights certificate files on the host are read with: the deployer's (the owner of
    /// the bundle file) at a deploy; `None`, keter's own, for the commands a user runs.
    pub reader: Option<crate::isolation::access::Ids>,
    /// The TCP port of keter's status interface, which no reverse proxy may reach.
    pub status_port: Option<u16>,
    /// The global `port-range`: the apps' ports, which no reverse proxy may reach either.
    pub app_ports: Option<RangeInclusive<u16>>,
}

impl Context {
    /// The checks a deploy with `config` makes.
    pub fn of(config: &crate::config::Config) -> Context {
        Context {
            allowed_static_roots: config.allowed_static_roots.clone(),
            host: true,
            acme: config.acme.is_some(),
            reader: None,
            status_port: match &config.status {
                Some(crate::status::StatusAddress::Tcp(a)) => Some(a.port()),
                _ => None,
            },
            app_ports: Some(config.port_range.clone()),
        }
    }
}

/// Reads `config/keter.yaml` (or `.yml`) from an unpacked bundle folder and checks it
/// ([`check_config`]). `label` names the bundle in messages (`hello.keter`). Returns the config
/// and the warnings.
pub fn read_config(
    dir: &Path,
    label: &str,
    ctx: &Context,
) -> Result<(BundleConfig, Problems), Invalid> {
    match check_config(dir, label, ctx) {
        (Some(c), problems) if !problems.has_errors() => Ok((c, problems)),
        (_, problems) => Err(Invalid(problems.errors)),
    }
}

/// Reads `config/keter.yaml` and checks it against the unpacked folder: every executable,
/// every static root (made absolute) and every stanza certificate (made absolute, and read to
/// see that key and certificate are a pair). Every problem, warnings included even when there
/// are errors; the config only when it could be read.
pub fn check_config(dir: &Path, label: &str, ctx: &Context) -> (Option<BundleConfig>, Problems) {
    let yaml_path = ["config/keter.yaml", "config/keter.yml"]
        .iter()
        .map(|p| dir.join(p))
        .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()));
    let Some(yaml_path) = yaml_path else {
        let mut problems = Problems::new(label);
        problems.error(
            "",
            "the bundle has no config/keter.yaml (or config/keter.yml)",
        );
        return (None, problems);
    };
    let rel = yaml_path.strip_prefix(dir).unwrap_or(&yaml_path);
    let mut problems = Problems::new(format!("{label}: {}", rel.display()));
    let mut config = yaml::read_file(&yaml_path, &mut problems)
        .and_then(|tree| config::from_tree(&tree, &mut problems));
    if let Some(c) = &mut config {
        resolve(c, dir, ctx, &mut problems);
    }
    (config, problems)
}

/// Checks every path of `config` against the unpacked folder and the host, and makes static
/// roots and certificate paths absolute.
fn resolve(config: &mut BundleConfig, dir: &Path, ctx: &Context, problems: &mut Problems) {
    let programs = config
        .webapps
        .iter()
        .map(|w| &w.program)
        .chain(config.background.iter().map(|b| &b.program));
    for program in programs {
        if program.exec.is_absolute() && !ctx.host {
            problems.warn(
                program.key("exec"),
                format!(
                    "{} is a path on the host; it is checked when the bundle is deployed",
                    program.exec.display()
                ),
            );
        } else if let Err(e) = resolve_exec(dir, &program.exec) {
            problems.error(program.key("exec"), e);
        }
        // A limit asked for where the kernel cannot enforce it is refused, never ignored
        // (README "Limits and accounting"); the host is known only to the daemon.
        if ctx.host
            && let Some(cgroups) = crate::cgroup::get()
        {
            for (key, why) in cgroups.unenforceable(&program.limits) {
                problems.error(program.key(key), why);
            }
        }
    }
    for st in &mut config.statics {
        let key = st.served.key("root");
        match resolve_static_root(dir, &st.root, ctx) {
            Ok(Some((real, base))) => {
                st.root = real;
                st.base = Some(base);
            }
            Ok(None) => problems.warn(
                key,
                format!(
                    "{} is outside the bundle; it is checked against allowed-static-roots when the bundle is deployed",
                    st.root.display()
                ),
            ),
            Err(e) => problems.error(key, e),
        }
    }
    for p in &config.proxies {
        check_reversed(p, ctx, problems);
    }
    for (tls, hosts, key) in config.tls_stanzas() {
        if *tls == Tls::Acme {
            check_acme(hosts, ctx, &key, problems);
        }
    }
    let served = config
        .webapps
        .iter_mut()
        .map(|w| {
            let key = w.program.key("ssl");
            (&mut w.tls, key)
        })
        .chain(config.statics.iter_mut().map(|s| {
            let key = s.served.key("ssl");
            (&mut s.served.tls, key)
        }))
        .chain(config.redirects.iter_mut().map(|r| {
            let key = r.served.key("ssl");
            (&mut r.served.tls, key)
        }))
        .chain(config.proxies.iter_mut().map(|p| {
            let key = p.served.key("ssl");
            (&mut p.served.tls, key)
        }));
    for (tls, key) in served {
        resolve_certificate(tls, dir, ctx, &key, problems);
    }
}

/// A reverse proxy must not reach keter's own listeners, nor the apps' ports, on this host
/// (README, "Security: who can reach what"): Nginx would publish keter's status interface,
/// every app's state, log lines and Nginx file, to whoever asks for the stanza's host, and a
/// proxy to a port of `port-range` would reach another app past its own Nginx settings
/// (basic-auth, rate limits, local-only). Refused when `reversed-host` is, or resolves now to,
/// a loopback or unspecified address or one of this host's own; a name can still resolve
/// elsewhere when Nginx reloads later, which the status interface itself guards against (it
/// refuses Nginx's workers). A name that does not resolve is left to `nginx -t`.
fn check_reversed(p: &ReverseProxy, ctx: &Context, problems: &mut Problems) {
    let port = p.reversed_port;
    let status = ctx.status_port == Some(port);
    let apps = ctx.app_ports.as_ref().filter(|r| r.contains(&port));
    if !status && apps.is_none() {
        return;
    }
    let host = &p.reversed_host;
    let ours = host_addresses();
    let (local, how) = match host.parse::<IpAddr>() {
        Ok(ip) => (is_local(ip, &ours), String::new()),
        // Only the deployment host can say where a name leads.
        Err(_) if !ctx.host => return,
        Err(_) => {
            let found = (host.as_str(), port)
                .to_socket_addrs()
                .map(|addrs| addrs.filter_map(|a| is_local(a.ip(), &ours)).next())
                .unwrap_or(None);
            let how = found
                .map(|ip| format!(" ({host} resolves to {ip}, an address of this host)"))
                .unwrap_or_default();
            (found, how)
        }
    };
    if local.is_none() {
        return;
    }
    let why = if status {
        format!(
            "{host}:{port}{how} is keter's own status interface (the global `status`): Nginx \
             would publish every app's state, log lines and configuration to whoever asks for \
             this stanza's host"
        )
    } else {
        let range = apps.map(|r| format!("{}-{}", r.start(), r.end()));
        format!(
            "{host}:{port}{how} is in port-range {}, the ports keter gives its apps: a reverse \
             proxy to it would reach another app past that app's own Nginx settings \
             (basic-auth, rate limits, local-only); proxy to one of that app's host names instead",
            range.unwrap_or_default()
        )
    };
    problems.error(p.served.key("reversed-port"), why);
}

/// `ip`, with an IPv4 address written as IPv6 (`::ffff:127.0.0.1`) as the IPv4 one, when it is
/// an address of this host: loopback, unspecified (which reaches this host) or in `ours`.
fn is_local(ip: IpAddr, ours: &[IpAddr]) -> Option<IpAddr> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    (ip.is_loopback() || ip.is_unspecified() || ours.contains(&ip)).then_some(ip)
}

/// The addresses of this host's interfaces (none if they cannot be listed).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

/// `ssl: acme`: the stanza's hosts must make a host set the CA can issue one certificate for
/// over HTTP-01 (no wildcard), and keter must know a CA (the global `acme` section).
fn check_acme(hosts: &[crate::names::Host], ctx: &Context, key: &str, problems: &mut Problems) {
    let names: Vec<crate::names::Hostname> = hosts.iter().map(|h| h.name.clone()).collect();
    if let Err(e) = crate::acme::HostSet::new(&names) {
        problems.error(key, e);
    }
    if ctx.host && !ctx.acme {
        problems.error(
            key,
            "ssl: acme needs the `acme` section of keter's global configuration (the CA's directory, a contact e-mail and accept-terms: true), which it does not have",
        );
    }
}

/// Makes a stanza's own certificate paths absolute and reads the files to check they are a
/// pair (or, without host checks, leaves absolute paths to the deploy).
fn resolve_certificate(
    tls: &mut Tls,
    dir: &Path,
    ctx: &Context,
    key: &str,
    problems: &mut Problems,
) {
    let Tls::Own {
        key: k,
        certificate,
        chain,
    } = tls
    else {
        return;
    };
    let on_host =
        k.is_absolute() || certificate.is_absolute() || chain.iter().any(|c| c.is_absolute());
    if on_host && !ctx.host {
        problems.warn(
            key,
            "the certificate files are paths on the host; they are checked when the bundle is deployed",
        );
        return;
    }
    let real_dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let reader = ctx.reader.as_ref().map(|ids| certs::Deployer {
        ids,
        bundle: &real_dir,
    });
    let mut resolve = |p: &PathBuf, which: &str| {
        certs::resolve(dir, p, reader)
            .map_err(|e| problems.error(format!("{key}.{which}"), e))
            .ok()
    };
    let paths = (
        resolve(k, "key"),
        resolve(certificate, "certificate"),
        chain
            .iter()
            .map(|c| resolve(c, "chain-certificates"))
            .collect::<Option<Vec<_>>>(),
    );
    let (Some(rk), Some(rc), Some(rchain)) = paths else {
        return;
    };
    let paths = certs::CertPaths {
        key: rk,
        certificate: rc,
        chain: rchain,
    };
    match certs::read(&paths, reader) {
        Ok(_) => {
            *k = paths.key;
            *certificate = paths.certificate;
            *chain = paths.chain;
        }
        Err(e) => problems.error(key, e),
    }
}

/// Why a path a bundle names (`exec`, a static root, a certificate file) cannot be used:
/// `path` as the bundle wrote it (or as resolved, where that says more) and the reason.
#[derive(Debug)]
pub struct PathError {
    pub path: PathBuf,
    pub why: PathWhy,
}

#[derive(Debug)]
pub enum PathWhy {
    /// Relative to `config/`, nothing is there.
    NotInBundle,
    /// An absolute path (or a static root outside the bundle) that does not exist.
    NotOnHost,
    /// A bundle-relative path given as an absolute one.
    Absolute,
    /// It leaves the bundle by its `..`.
    PointsOutside,
    /// It leaves the bundle through a symlink.
    ResolvesOutside,
    /// A static root outside the bundle and outside every `allowed-static-roots` folder
    /// (`allowed`): `real` is where it resolves.
    NotAllowed {
        real: PathBuf,
        allowed: Vec<PathBuf>,
    },
    NotRegular,
    NotExecutable,
    NotAFolder,
    /// It cannot be written into an Nginx file.
    NotForNginx(crate::names::ConfPathError),
    /// The unpacked folder itself cannot be resolved.
    BundleFolder(std::io::Error),
    /// Another error of the system.
    Io(std::io::Error),
}

impl PathError {
    fn new(path: &Path, why: PathWhy) -> PathError {
        PathError {
            path: path.to_path_buf(),
            why,
        }
    }

    /// The I/O error underneath, if any.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match &self.why {
            PathWhy::BundleFolder(e) | PathWhy::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.path.display();
        match &self.why {
            PathWhy::NotInBundle => write!(f, "{p} is not in the bundle"),
            PathWhy::NotOnHost => write!(f, "{p} does not exist on this host"),
            PathWhy::Absolute => write!(
                f,
                "{p} is an absolute path; paths are relative to config/ and stay inside the bundle"
            ),
            PathWhy::PointsOutside => write!(f, "{p} points outside the bundle"),
            PathWhy::ResolvesOutside => write!(f, "{p} resolves outside the bundle"),
            PathWhy::NotAllowed { real, allowed } => {
                write!(
                    f,
                    "{p} resolves to {}, outside the bundle; the global allowed-static-roots ",
                    real.display()
                )?;
                if allowed.is_empty() {
                    f.write_str("lists no folder")
                } else {
                    let listed: Vec<String> =
                        allowed.iter().map(|a| a.display().to_string()).collect();
                    write!(f, "lists only {}", listed.join(", "))
                }
            }
            PathWhy::NotRegular => write!(f, "{p} is not a regular file"),
            PathWhy::NotExecutable => write!(f, "{p} is not executable"),
            PathWhy::NotAFolder => write!(f, "{p} is not a folder"),
            PathWhy::NotForNginx(e) => write!(f, "{e}"),
            PathWhy::BundleFolder(e) => write!(f, "cannot resolve the bundle folder: {e}"),
            PathWhy::Io(e) => write!(f, "{p}: {e}"),
        }
    }
}

impl std::error::Error for PathError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.why {
            PathWhy::NotForNginx(e) => Some(e),
            _ => self.io_error().map(|e| e as _),
        }
    }
}

/// The unpacked folder, symlinks resolved.
fn real_bundle(dir: &Path) -> Result<PathBuf, PathError> {
    dir.canonicalize()
        .map_err(|e| PathError::new(dir, PathWhy::BundleFolder(e)))
}

/// Resolves a stanza's `exec` to a regular executable file: relative to `config/`, it must
/// stay inside the unpacked folder (symlinks are followed only while they stay inside); an
/// absolute path names a program on the host, as in Keter (NixOS's module points `exec` into
/// `/nix/store`). Either way the app runs as the `setuid` user, so the host path gives a bundle
/// nothing it could not bring itself.
pub fn resolve_exec(dir: &Path, exec: &Path) -> Result<PathBuf, PathError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |why| PathError::new(exec, why);
    let real = if exec.is_absolute() {
        exec.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => error(PathWhy::NotOnHost),
            _ => error(PathWhy::Io(e)),
        })?
    } else {
        let lexical = crate::config::normalize(&dir.join("config").join(exec));
        let root = real_bundle(dir)?;
        if !lexical.starts_with(dir) {
            return Err(error(PathWhy::PointsOutside));
        }
        let real = match lexical.canonicalize() {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(error(PathWhy::NotInBundle));
            }
            Err(e) => return Err(error(PathWhy::Io(e))),
        };
        if !real.starts_with(&root) {
            return Err(error(PathWhy::ResolvesOutside));
        }
        real
    };
    let meta = real.metadata().map_err(|e| error(PathWhy::Io(e)))?;
    if !meta.is_file() {
        return Err(error(PathWhy::NotRegular));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(error(PathWhy::NotExecutable));
    }
    Ok(real)
}

/// Resolves a static-files root (relative to `config/`, or absolute) to a folder, symlinks
/// followed: inside the unpacked bundle, or inside one of `allowed-static-roots`. Keter served
/// `../../` or `/home` if asked; keter serves a folder outside the bundle only where the
/// operator allows it. Returns the root and the folder it is in (the bundle, or the allowed
/// folder), both resolved; `Ok(None)` when the root is outside the bundle and host checks are
/// off.
pub fn resolve_static_root(
    dir: &Path,
    root: &Path,
    ctx: &Context,
) -> Result<Option<(PathBuf, PathBuf)>, PathError> {
    let error = |why| PathError::new(root, why);
    let joined = crate::config::normalize(&dir.join("config").join(root));
    let bundle = real_bundle(dir)?;
    let real = match joined.canonicalize() {
        Ok(r) => r,
        Err(_) if !ctx.host && !joined.starts_with(dir) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(if joined.starts_with(dir) {
                error(PathWhy::NotInBundle)
            } else {
                PathError::new(&joined, PathWhy::NotOnHost)
            });
        }
        Err(e) => return Err(error(PathWhy::Io(e))),
    };
    let mut base = bundle.clone();
    if !real.starts_with(&bundle) {
        if !ctx.host {
            return Ok(None);
        }
        let allowed = ctx
            .allowed_static_roots
            .iter()
            .find(|a| real.starts_with(a));
        let Some(allowed) = allowed else {
            return Err(error(PathWhy::NotAllowed {
                real,
                allowed: ctx.allowed_static_roots.clone(),
            }));
        };
        base = allowed.clone();
    }
    if !real.is_dir() {
        return Err(error(PathWhy::NotAFolder));
    }
    crate::names::check_conf_path(&real).map_err(|e| error(PathWhy::NotForNginx(e)))?;
    Ok(Some((real, base)))
}

/// Resolves a file of the bundle (relative to `config/`) inside the unpacked folder.
pub fn resolve_file(dir: &Path, rel: &Path) -> Result<PathBuf, PathError> {
    let real = resolve_inside(dir, rel)?;
    if !real.is_file() {
        return Err(PathError::new(rel, PathWhy::NotRegular));
    }
    Ok(real)
}

fn resolve_inside(dir: &Path, rel: &Path) -> Result<PathBuf, PathError> {
    let error = |why| PathError::new(rel, why);
    if rel.is_absolute() {
        return Err(error(PathWhy::Absolute));
    }
    let joined = dir.join("config").join(rel);
    let root = real_bundle(dir)?;
    let real = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => error(PathWhy::NotInBundle),
        _ => error(PathWhy::Io(e)),
    })?;
    if !real.starts_with(&root) {
        return Err(error(PathWhy::ResolvesOutside));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(host: &str, port: u16) -> ReverseProxy {
        let text = format!(
            "stanzas:\n  - type: reverse-proxy\n    reversing-host: p.example.com\n    reversed-host: \"{host}\"\n    reversed-port: {port}\n"
        );
        let mut problems = Problems::new("p.keter: config/keter.yaml");
        let tree = yaml::parse(&text).unwrap();
        let config = config::from_tree(&tree, &mut problems).unwrap();
        assert!(!problems.has_errors(), "{:?}", problems.errors);
        config.proxies[0].clone()
    }

    fn refusal(host: &str, port: u16, ctx: &Context) -> Option<String> {
        let mut problems = Problems::new("p.keter: config/keter.yaml");
        check_reversed(&proxy(host, port), ctx, &mut problems);
        problems.errors.first().map(|e| {
            assert_eq!(e.key, "stanzas[0].reversed-port");
            e.message.clone()
        })
    }

    #[test]
    fn reverse_proxies_to_keters_listeners_and_the_apps_ports_are_refused() {
        let ctx = Context {
            host: true,
            status_port: Some(4080),
            app_ports: Some(4000..=4999),
            ..Context::default()
        };
        let ours = host_addresses()
            .into_iter()
            .find(|ip| !ip.is_loopback())
            .map(|ip| ip.to_string());
        let mut local = vec![
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "localhost",
        ];
        local.extend(ours.as_deref());
        for host in local {
            let why = refusal(host, 4080, &ctx)
                .unwrap_or_else(|| panic!("{host}:4080 is keter's status interface"));
            assert!(why.contains("keter's own status interface"), "{why}");
            let why =
                refusal(host, 4003, &ctx).unwrap_or_else(|| panic!("{host}:4003 is an app's port"));
            assert!(why.contains("in port-range 4000-4999"), "{why}");
        }
        let why = refusal("localhost", 4080, &ctx).unwrap();
        assert!(
            why.contains("localhost resolves to 127.0.0.1") || why.contains("resolves to ::1"),
            "{why}"
        );
        // Other ports of this host, other hosts, names that do not resolve: left alone.
        assert_eq!(refusal("127.0.0.1", 9000, &ctx), None);
        assert_eq!(refusal("192.0.2.1", 4080, &ctx), None);
        assert_eq!(refusal("no-such-host.invalid", 4080, &ctx), None);
        // `keter bundle` on a build machine knows neither the status address nor port-range.
        assert_eq!(refusal("127.0.0.1", 4080, &Context::default()), None);
        // A status interface on a unix socket has no port to protect.
        let socket = Context {
            status_port: None,
            app_ports: Some(5000..=5999),
            ..ctx.clone()
        };
        assert_eq!(refusal("127.0.0.1", 4080, &socket), None);
    }
}
