//! What an app asks Nginx to serve ([`Site`]: one block per stanza with hosts), and how it
//! becomes `server` blocks: one for the plain HTTP listeners and one per certificate for the
//! TLS listeners, each with the ACME challenge folder, the health check path, and the
//! stanza's own content (proxy to the app, static files, redirect, reverse proxy).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::config::Listener;
use crate::names::{AppName, Hostname, RedirectUrl, UrlPath};

/// Everything of one app that Nginx serves.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Site {
    pub app: AppName,
    /// Bundle file name (the app name plus `.keter`).
    pub bundle: String,
    /// Hex SHA-256 of the bundle.
    pub sha256: String,
    /// Deploy number of this app within this daemon run.
    pub deploy: u64,
    pub blocks: Vec<Block>,
}

/// One stanza's hosts and what they get.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    pub hosts: Vec<Hostname>,
    pub content: Content,
    /// The stanza's own certificate (copied into keter's folder); otherwise each TLS
    /// listener's.
    pub certificate: Option<CertFiles>,
    /// Plain HTTP requests get a 301 to https.
    pub requires_secure: bool,
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
    /// Files under `root` (inside the unpacked bundle).
    Static { root: PathBuf, listing: bool },
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
    /// The same path and query on another host.
    Host {
        secure: bool,
        host: Hostname,
        port: Option<u16>,
    },
}

/// What the template gets for one `server` block.
#[derive(Debug, Serialize)]
pub(super) struct ServerView {
    pub listens: Vec<String>,
    pub server_names: String,
    pub certificate: Option<CertFiles>,
    /// Serve `/.well-known/acme-challenge/` (plain HTTP servers).
    pub acme: bool,
    /// Every other request gets a 301 to `https://$host{https_suffix}$request_uri`.
    pub redirect_https: bool,
    /// `:PORT` when the external HTTPS port is not 443.
    pub https_suffix: String,
    pub content: ContentView,
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
        listing: bool,
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

/// The TLS parts of the front end that server blocks need.
pub(super) struct Front<'a> {
    pub listeners: &'a [Listener],
    /// Certificate files of each TLS listener (chain already appended where needed), by index.
    pub listener_certs: &'a [Option<CertFiles>],
    pub external_https_port: u16,
}

/// An Nginx time value in milliseconds; no bound is rendered as a year.
pub(super) fn nginx_time(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{}ms", d.as_millis().max(1)),
        None => "365d".to_string(),
    }
}

/// The upstream name of the app's `index`-th webapp block.
pub(super) fn upstream_name(app: &AppName, index: usize, webapps: usize) -> String {
    if webapps == 1 {
        format!("keter-{app}")
    } else {
        format!("keter-{app}-{}", index + 1)
    }
}

/// The `server` blocks of one stanza block. `upstream` names the app's upstream for `App`.
pub(super) fn servers(block: &Block, upstream: Option<&str>, front: &Front) -> Vec<ServerView> {
    let names: Vec<String> = block.hosts.iter().map(Hostname::server_name).collect();
    let server_names = names.join(" ");
    let content = || content_view(&block.content, upstream);
    let mut out = Vec::new();
    let plain: Vec<String> = front
        .listeners
        .iter()
        .filter(|l| l.tls.is_none())
        .map(|l| l.nginx_address())
        .collect();
    let has_tls = front.listeners.iter().any(|l| l.tls.is_some());
    if !plain.is_empty() {
        out.push(ServerView {
            listens: plain,
            server_names: server_names.clone(),
            certificate: None,
            acme: true,
            redirect_https: block.requires_secure && has_tls,
            https_suffix: if front.external_https_port == 443 {
                String::new()
            } else {
                format!(":{}", front.external_https_port)
            },
            content: content(),
        });
    }
    // TLS listeners, grouped by the certificate they present for these hosts.
    let mut groups: Vec<(CertFiles, Vec<String>)> = Vec::new();
    for (i, l) in front.listeners.iter().enumerate() {
        if l.tls.is_none() {
            continue;
        }
        let Some(cert) = block
            .certificate
            .clone()
            .or_else(|| front.listener_certs.get(i).cloned().flatten())
        else {
            continue;
        };
        let listen = format!("{} ssl http2", l.nginx_address());
        match groups.iter_mut().find(|(c, _)| *c == cert) {
            Some((_, listens)) => listens.push(listen),
            None => groups.push((cert, vec![listen])),
        }
    }
    for (cert, listens) in groups {
        out.push(ServerView {
            listens,
            server_names: server_names.clone(),
            certificate: Some(cert),
            acme: false,
            redirect_https: false,
            https_suffix: String::new(),
            content: content(),
        });
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
        Content::Static { root, listing } => ContentView::Static {
            root: root.display().to_string(),
            listing: *listing,
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
                                format!("{scheme}://{host}:{p}$request_uri")
                            }
                            _ => format!("{scheme}://{host}$request_uri"),
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
