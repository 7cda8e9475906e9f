//! What Nginx serves for a bundle ([`site_of`]): one block per stanza with hosts, built from
//! the bundle's checked configuration. The daemon's deploys and `keter render` share it.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::bundle::certs::CertError;
use crate::bundle::middleware::Middlewares;
use crate::bundle::served::Served;
use crate::bundle::{BundleConfig, RedirectTo, Tls};
use crate::config::Config;
use crate::names::{AppName, Host};
use crate::nginx::middleware::htpasswd;
use crate::nginx::{Block, CertFiles, Content, RedirectRule, RedirectTarget, Site, SiteFile};

/// Turns a stanza's `ssl`, the hosts Nginx routes to it, and its key path (for messages) into
/// the certificate files Nginx reads. For `ssl: acme`, `None` until the certificate exists.
pub type CertSource<'a> =
    dyn FnMut(&Tls, &[Host], &str) -> Result<Option<CertFiles>, SiteError> + 'a;

/// Why a site cannot be built: a stanza's own certificate (`origin` is its `ssl` key).
#[derive(Debug)]
pub enum SiteError {
    /// The certificate files cannot be read or are not a pair.
    Certificate { origin: String, source: CertError },
    /// keter's copy of them cannot be written.
    Copy { origin: String, source: io::Error },
    /// keter's copy of them is not in `dir`.
    CopyMissing { origin: String, dir: PathBuf },
}

impl SiteError {
    /// The I/O error underneath, if the failure is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            SiteError::Certificate { source, .. } => source.io_error(),
            SiteError::Copy { source, .. } => Some(source),
            SiteError::CopyMissing { .. } => None,
        }
    }
}

impl fmt::Display for SiteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteError::Certificate { origin, source } => write!(f, "{origin}: {source}"),
            SiteError::Copy { origin, source } => {
                write!(f, "{origin}: cannot copy the certificate: {source}")
            }
            SiteError::CopyMissing { origin, dir } => write!(
                f,
                "{origin}: keter's copy of the certificate is missing from {}",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for SiteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SiteError::Certificate { source, .. } => Some(source),
            SiteError::Copy { source, .. } => Some(source),
            SiteError::CopyMissing { .. } => None,
        }
    }
}

/// What a site is built from: a bundle's configuration, checked against its unpacked folder by
/// `bundle::check_config` (static roots and certificates are absolute), and where its webapps
/// listen.
pub struct SiteSource<'a> {
    pub app: &'a AppName,
    pub bundle: &'a BundleConfig,
    pub sha256: &'a str,
    pub deploy: u64,
    /// (webapp index, port) of each webapp.
    pub ports: &'a [(usize, u16)],
}

/// What Nginx serves for a bundle: one block per stanza with hosts. `certs` turns a stanza's
/// `ssl` into certificate files (the daemon copies them into its own folder; `keter render`
/// shows them where they are).
pub fn site_of(
    global: &Config,
    src: &SiteSource,
    certs: &mut CertSource,
) -> Result<Site, SiteError> {
    let config = src.bundle;
    let mut blocks = Vec::new();
    let mut files = Vec::new();
    let mut add = |blocks: &mut Vec<Block>, block: Block, middleware: &Middlewares| {
        if block.hosts.is_empty() {
            // Every host of the stanza is served by another stanza of the bundle.
            return;
        }
        let mut block = block;
        if let Some(auth) = &middleware.basic_auth {
            let file = SiteFile::new(htpasswd(&auth.users), "htpasswd");
            block.auth_file = Some(file.name.clone());
            files.push(file);
        }
        block.middleware = middleware.clone();
        blocks.push(block);
    };
    let max_body = |stanza: Option<u64>| stanza.unwrap_or(global.client_max_body_size);
    for &(index, port) in src.ports {
        let w = &config.webapps[index];
        let block = Block {
            hosts: w.routed.clone(),
            content: Content::App {
                port,
                timeout: w
                    .connection_time_bound
                    .unwrap_or(global.connection_time_bound),
            },
            certificate: certs(&w.tls, &w.routed, &w.program.key("ssl"))?,
            acme: w.tls == Tls::Acme,
            requires_secure: w.requires_secure,
            max_body: max_body(w.max_body),
            middleware: Middlewares::default(),
            auth_file: None,
        };
        add(&mut blocks, block, &w.middleware);
    }
    for st in &config.statics {
        let content = Content::Static {
            root: st.root.clone(),
            symlinks_from: st.base.clone(),
            listing: st.directory_listing,
            send_timeout: st.time_bound,
        };
        let block = served(&st.served, content, max_body(st.served.max_body), certs)?;
        add(&mut blocks, block, &st.middleware);
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
        let content = Content::Redirect {
            status: r.status,
            rules,
        };
        let block = served(&r.served, content, max_body(r.served.max_body), certs)?;
        add(&mut blocks, block, &Middlewares::default());
    }
    for p in &config.proxies {
        let content = Content::ReverseProxy {
            https: p.reversed_ssl,
            host: p.reversed_host.clone(),
            port: p.reversed_port,
            preserve_host: p.preserve_host,
            timeout: p.timeout.unwrap_or(global.connection_time_bound),
        };
        let block = served(&p.served, content, max_body(p.served.max_body), certs)?;
        add(&mut blocks, block, &p.middleware);
    }
    Ok(Site {
        app: src.app.clone(),
        bundle: format!("{}.keter", src.app),
        sha256: src.sha256.to_string(),
        deploy: src.deploy,
        blocks,
        files,
        maintenance: None,
    })
}

/// The block of a stanza Nginx serves by itself.
fn served(
    s: &Served,
    content: Content,
    max_body: u64,
    certs: &mut CertSource,
) -> Result<Block, SiteError> {
    Ok(Block {
        hosts: s.routed.clone(),
        content,
        certificate: certs(&s.tls, &s.routed, &s.key("ssl"))?,
        acme: s.tls == Tls::Acme,
        requires_secure: s.requires_secure,
        max_body,
        middleware: Middlewares::default(),
        auth_file: None,
    })
}
