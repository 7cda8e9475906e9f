//! What an app asks Nginx to serve ([`Site`]: one block per stanza with hosts), and how it
//! becomes `server` blocks: one for the plain HTTP listeners and one per certificate for the
//! TLS listeners, each with the ACME challenge folder, the health check path, and the
//! stanza's own content (proxy to the app, static files, redirect, reverse proxy) behind its
//! middlewares.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::middleware::LocationView;
use crate::bundle::middleware::Middlewares;
use crate::config::Listener;
use crate::names::{AppName, Host, Hostname, RedirectUrl, UrlPath};

/// Everything of one app that Nginx serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub app: AppName,
    /// Bundle file name (the app name plus `.keter`).
    pub bundle: String,
    /// Hex SHA-256 of the bundle.
    pub sha256: String,
    /// Deploy number of this app within this daemon run.
    pub deploy: u64,
    pub blocks: Vec<Block>,
    /// Files Nginx's workers read for this site (password files), written into
    /// `worker-files/apps/NAME/` before the configuration that names them.
    pub files: Vec<SiteFile>,
    /// `keter maintenance NAME on`: the file (one of `files`) of the page every request gets,
    /// with 503 (README "Releases and rollback").
    pub maintenance: Option<String>,
}

/// A file of a site, named by its content so that a new version never overwrites the file a
/// running configuration reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteFile {
    /// `HASH.htpasswd`: hex digits and a fixed suffix, safe in a path.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl SiteFile {
    /// A file named after the SHA-256 of its content and `suffix`.
    pub fn new(bytes: Vec<u8>, suffix: &str) -> SiteFile {
        use sha2::{Digest, Sha256};
        let hash: String = Sha256::digest(&bytes)[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        SiteFile {
            name: format!("{hash}.{suffix}"),
            bytes,
        }
    }
}

/// One stanza's hosts and what they get.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The hosts routed to this stanza; a host with a port answers only that port in `Host`.
    pub hosts: Vec<Host>,
    pub content: Content,
    /// The stanza's own certificate (copied into keter's folder); otherwise each TLS
    /// listener's.
    pub certificate: Option<CertFiles>,
    /// The certificate comes over ACME (`ssl: acme`): never the listeners' own. Until it
    /// exists (`certificate` is `None`) the hosts get no TLS server, and `requires_secure`
    /// no redirect to an HTTPS that would not work.
    pub acme: bool,
    /// Plain HTTP requests get a 301 to https.
    pub requires_secure: bool,
    /// `client_max_body_size`; 0 for no limit.
    pub max_body: u64,
    pub middleware: Middlewares,
    /// The password file of `middleware.basic_auth`, one of the site's files.
    pub auth_file: Option<String>,
}

/// Certificate and key files, validated for an Nginx file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// What a block serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Content {
    /// A webapp on `127.0.0.1:port`.
    App {
        port: u16,
        /// Per-request bound; `None` for none.
        timeout: Option<Duration>,
    },
    /// Files under `root` (inside the unpacked bundle, or an allowed folder).
    Static {
        root: PathBuf,
        /// The folder holding `root` that the app cannot replace (the unpacked bundle, or
        /// the `allowed-static-roots` folder): below it Nginx follows a symlink only to what
        /// the symlink's owner owns. `None`: every component of a path is checked.
        symlinks_from: Option<PathBuf>,
        listing: bool,
        /// Keter's `connection-time-bound` of the stanza, as Nginx's `send_timeout`;
        /// `Some(None)` for none, `None` for Nginx's default.
        send_timeout: Option<Option<Duration>>,
    },
    /// `return STATUS` to the first rule whose path matches.
    Redirect {
        status: u16,
        rules: Vec<RedirectRule>,
    },
    /// `proxy_pass` to another server.
    ReverseProxy {
        https: bool,
        /// A validated host name or IP address.
        host: String,
        port: u16,
        /// `true`: pass the client's `Host`; `false`: send `host`.
        preserve_host: bool,
        timeout: Option<Duration>,
    },
}

/// One redirect action of a redirect stanza.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedirectRule {
    /// Only this exact path; `None` for every path.
    pub path: Option<UrlPath>,
    pub target: RedirectTarget,
}

/// Where a redirect goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RedirectTarget {
    /// This exact URL.
    Url { url: RedirectUrl },
    /// The same path and query on another host, written as the configuration gives it.
    Host {
        secure: bool,
        host: Host,
        port: Option<u16>,
    },
}

/// What the template gets for one `server` block.
#[derive(Debug, Serialize)]
pub(super) struct ServerView {
    pub listens: Vec<String>,
    pub server_names: String,
    pub certificate: Option<CertFiles>,
    /// Resume TLS sessions from a shared cache (a listener's `session: true`).
    pub session_cache: bool,
    /// Only requests whose `Host` header matches this (anchored, case-insensitive) regular
    /// expression; the others get the unknown-host 404. For hosts listed with a port.
    pub host_check: Option<String>,
    /// `client_max_body_size`.
    pub max_body: u64,
    /// Serve `/.well-known/acme-challenge/` (plain HTTP servers).
    pub acme: bool,
    /// Every other request gets a 301 to `https://$host{https_suffix}$request_uri`.
    pub redirect_https: bool,
    /// `:PORT` when the external HTTPS port is not 443.
    pub https_suffix: String,
    /// `http` or `https`: what the server's listeners speak, for `X-Forwarded-Proto` (written
    /// out rather than `$scheme`, which Nginx would look up at every request).
    pub scheme: &'static str,
    /// Nginx's 502 and 504 get the operator's proxy-exception page (proxied content only).
    pub proxy_exception: bool,
    pub content: ContentView,
    /// The middlewares, rendered into the content's location.
    pub location: LocationView,
}

/// The content part of a server, ready to print.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(super) enum ContentView {
    App {
        upstream: String,
        timeout: String,
    },
    Static {
        root: String,
        /// `disable_symlinks if_not_owner`, with `from=` this when given.
        symlinks_from: Option<String>,
        listing: bool,
        send_timeout: Option<String>,
    },
    Redirect {
        rules: Vec<RuleView>,
        catch_all: bool,
    },
    ReverseProxy {
        pass: String,
        host_header: String,
        timeout: String,
    },
}

#[derive(Debug, Serialize)]
pub(super) struct RuleView {
    /// `location = PATH` or `location /`.
    pub location: String,
    pub status: u16,
    pub target: String,
}

/// The parts of the front end that server blocks need.
pub(super) struct Front<'a> {
    pub listeners: &'a [Listener],
    /// Certificate files of each TLS listener (chain already appended where needed), by index.
    pub listener_certs: &'a [Option<CertFiles>],
    pub external_https_port: u16,
    /// An operator's proxy-exception page exists.
    pub proxy_exception_page: bool,
}

/// An Nginx time value in milliseconds; no bound is rendered as a year.
pub(super) fn nginx_time(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{}ms", d.as_millis().max(1)),
        None => "365d".to_string(),
    }
}

/// Each address once, in order: two listeners may share one (`*` and `*4`), and Nginx refuses
/// a server that listens twice on the same address.
fn unique(addrs: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The groups of hosts that become separate `server` blocks: the hosts without a port, then
/// the names listed only with ports, whose server checks the `Host` header's port (Nginx
/// matches `server_name` without the port; Keter matches the whole header first).
fn host_groups(hosts: &[Host]) -> Vec<(Vec<&Hostname>, Option<String>)> {
    let bare: Vec<&Hostname> = hosts
        .iter()
        .filter(|h| h.port.is_none())
        .map(|h| &h.name)
        .collect();
    let mut ported: Vec<&Hostname> = Vec::new();
    let mut alternatives: Vec<String> = Vec::new();
    for h in hosts {
        if let Some(port) = h.port
            && !bare.contains(&&h.name)
        {
            if !ported.contains(&&h.name) {
                ported.push(&h.name);
            }
            alternatives.push(format!("{}:{port}", h.name.pattern()));
        }
    }
    let mut out = Vec::new();
    if !bare.is_empty() {
        out.push((bare, None));
    }
    if !ported.is_empty() {
        out.push((ported, Some(format!("^({})$", alternatives.join("|")))));
    }
    out
}

/// The `server` blocks of one stanza block. `upstream` names the app's upstream for `App`;
/// `location` is the block's middlewares, rendered.
pub(super) fn servers(
    block: &Block,
    upstream: Option<&str>,
    location: &LocationView,
    front: &Front,
) -> Vec<ServerView> {
    let mut out = Vec::new();
    let proxied = matches!(
        block.content,
        Content::App { .. } | Content::ReverseProxy { .. }
    );
    let plain = unique(
        front
            .listeners
            .iter()
            .filter(|l| !l.is_tls())
            .flat_map(|l| l.nginx_addresses()),
    );
    // TLS listeners, grouped by the certificate they present for these hosts and whether
    // they resume sessions.
    let mut groups: Vec<(CertFiles, bool, Vec<String>)> = Vec::new();
    for (i, l) in front.listeners.iter().enumerate() {
        if !l.is_tls() {
            continue;
        }
        let own = block.certificate.clone();
        let Some(cert) = (if block.acme {
            own
        } else {
            own.or_else(|| front.listener_certs.get(i).cloned().flatten())
        }) else {
            continue;
        };
        let listens = l
            .nginx_addresses()
            .into_iter()
            .map(|a| format!("{a} ssl http2"));
        match groups
            .iter_mut()
            .find(|(c, s, _)| *c == cert && *s == l.session)
        {
            Some((_, _, all)) => {
                for a in listens {
                    if !all.contains(&a) {
                        all.push(a);
                    }
                }
            }
            None => groups.push((cert, l.session, unique(listens))),
        }
    }
    for (names, host_check) in host_groups(&block.hosts) {
        let server_names = unique(names.iter().map(|n| n.server_name())).join(" ");
        let server = |listens: Vec<String>, tls: Option<(&CertFiles, bool)>| ServerView {
            listens,
            server_names: server_names.clone(),
            certificate: tls.map(|(c, _)| c.clone()),
            session_cache: tls.is_some_and(|(_, s)| s),
            host_check: host_check.clone(),
            max_body: block.max_body,
            acme: tls.is_none(),
            redirect_https: tls.is_none() && block.requires_secure && !groups.is_empty(),
            scheme: if tls.is_some() { "https" } else { "http" },
            https_suffix: if front.external_https_port == 443 {
                String::new()
            } else {
                format!(":{}", front.external_https_port)
            },
            proxy_exception: proxied && front.proxy_exception_page,
            content: content_view(&block.content, upstream),
            location: location.clone(),
        };
        if !plain.is_empty() {
            out.push(server(plain.clone(), None));
        }
        for (cert, session, listens) in &groups {
            out.push(server(listens.clone(), Some((cert, *session))));
        }
    }
    out
}

fn content_view(content: &Content, upstream: Option<&str>) -> ContentView {
    match content {
        Content::App { timeout, .. } => ContentView::App {
            upstream: upstream.unwrap_or_default().to_string(),
            // Resolved already (`src/app/site.rs`): `None` is a stanza's `0`, no bound.
            timeout: nginx_time(*timeout),
        },
        Content::Static {
            root,
            symlinks_from,
            listing,
            send_timeout,
        } => ContentView::Static {
            root: root.display().to_string(),
            symlinks_from: symlinks_from.as_ref().map(|p| p.display().to_string()),
            listing: *listing,
            send_timeout: send_timeout.map(nginx_time),
        },
        Content::Redirect { status, rules } => {
            let mut views: Vec<RuleView> = Vec::new();
            let mut catch_all = false;
            for rule in rules {
                let location = match &rule.path {
                    Some(p) => format!("= {p}"),
                    None if catch_all => continue, // only the first catch-all applies
                    None => {
                        catch_all = true;
                        "/".to_string()
                    }
                };
                let target = match &rule.target {
                    RedirectTarget::Url { url } => url.as_str().to_string(),
                    RedirectTarget::Host { secure, host, port } => {
                        let scheme = if *secure { "https" } else { "http" };
                        let default = if *secure { 443 } else { 80 };
                        match port {
                            Some(p) if *p != default => {
                                format!("{scheme}://{}:{p}$request_uri", host.original())
                            }
                            _ => format!("{scheme}://{}$request_uri", host.original()),
                        }
                    }
                };
                views.push(RuleView {
                    location,
                    status: *status,
                    target,
                });
            }
            ContentView::Redirect {
                rules: views,
                catch_all,
            }
        }
        Content::ReverseProxy {
            https,
            host,
            port,
            preserve_host,
            timeout,
        } => {
            let scheme = if *https { "https" } else { "http" };
            let literal = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            ContentView::ReverseProxy {
                pass: format!("{scheme}://{literal}:{port}"),
                host_header: if *preserve_host {
                    "$host".to_string()
                } else {
                    literal
                },
                timeout: nginx_time(*timeout),
            }
        }
    }
}
