//! What Nginx serves for a bundle ([`site_of`]): one block per stanza with hosts, built from
//! the bundle's validated configuration. The daemon's deploys and `keter render` share it.

use std::path::Path;

use crate::bundle::{self, BundleConfig, RedirectTo, Tls};
use crate::config::Config;
use crate::names::AppName;
use crate::nginx::{Block, CertFiles, Content, RedirectRule, RedirectTarget, Site};

/// Turns a stanza's `ssl` (and its key path, for messages) into the certificate files Nginx
/// reads.
pub type CertSource<'a> = dyn FnMut(&Tls, &str) -> Result<Option<CertFiles>, String> + 'a;

/// What a site is built from: a bundle's configuration and where its webapps listen.
pub struct SiteSource<'a> {
    pub app: &'a AppName,
    pub bundle: &'a BundleConfig,
    /// The unpacked folder (static roots are resolved inside it).
    pub dir: &'a Path,
    pub sha256: &'a str,
    pub deploy: u64,
    /// (webapp index, port) of each webapp.
    pub ports: &'a [(usize, u16)],
}

/// What Nginx serves for a bundle: one block per stanza with hosts. `certs` turns a stanza's
/// `ssl` into certificate files (the daemon copies them out of the bundle; `keter render`
/// shows them where they are).
pub fn site_of(global: &Config, src: &SiteSource, certs: &mut CertSource) -> Result<Site, String> {
    let config = src.bundle;
    let mut blocks = Vec::new();
    for &(index, port) in src.ports {
        let w = &config.webapps[index];
        blocks.push(Block {
            hosts: w.hosts.clone(),
            content: Content::App {
                port,
                timeout: w
                    .connection_time_bound
                    .unwrap_or(global.connection_time_bound),
            },
            certificate: certs(&w.tls, &w.program.key("ssl"))?,
            requires_secure: w.requires_secure,
        });
    }
    for st in &config.statics {
        let root = bundle::resolve_dir(src.dir, &st.root)
            .map_err(|e| format!("{}: {e}", key(&st.origin, "root")))?;
        crate::names::check_conf_path(&root)?;
        blocks.push(Block {
            hosts: st.served.hosts.clone(),
            content: Content::Static {
                root,
                listing: st.directory_listing,
            },
            certificate: certs(&st.served.tls, &key(&st.origin, "ssl"))?,
            requires_secure: st.served.requires_secure,
        });
    }
    for r in &config.redirects {
        let rules = r
            .actions
            .iter()
            .map(|a| RedirectRule {
                path: a.path.clone(),
                target: match &a.target {
                    RedirectTo::Url(url) => RedirectTarget::Url { url: url.clone() },
                    RedirectTo::Host { host, secure, port } => RedirectTarget::Host {
                        secure: *secure,
                        host: host.clone(),
                        port: *port,
                    },
                },
            })
            .collect();
        blocks.push(Block {
            hosts: r.served.hosts.clone(),
            content: Content::Redirect {
                status: r.status,
                rules,
            },
            certificate: certs(&r.served.tls, "redirect.ssl")?,
            requires_secure: r.served.requires_secure,
        });
    }
    for p in &config.proxies {
        blocks.push(Block {
            hosts: p.served.hosts.clone(),
            content: Content::ReverseProxy {
                https: p.reversed_ssl,
                host: p.reversed_host.clone(),
                port: p.reversed_port,
                preserve_host: p.preserve_host,
                timeout: p.timeout.unwrap_or(global.connection_time_bound),
            },
            certificate: certs(&p.served.tls, "reverse-proxy.ssl")?,
            requires_secure: p.served.requires_secure,
        });
    }
    Ok(Site {
        app: src.app.clone(),
        bundle: format!("{}.keter", src.app),
        sha256: src.sha256.to_string(),
        deploy: src.deploy,
        blocks,
    })
}

/// `stanzas[1].root` from a stanza's origin and a key.
fn key(origin: &str, key: &str) -> String {
    if origin.is_empty() {
        key.to_string()
    } else {
        format!("{origin}.{key}")
    }
}
