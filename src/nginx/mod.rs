//! Nginx: rendering keter's configuration files from the Tera templates in `templates/`
//! ([`Renderer`]), and the controller that alone writes them and signals Nginx
//! ([`controller`]).
//!
//! Templates only ever receive validated values (`AppName`, `Hostname`, ports, checked
//! paths): `.conf` output is not escaped, so nothing unvalidated may reach it.

pub mod controller;
mod error;
pub mod middleware;
mod objects;
pub mod site;
pub mod system;
mod worker_files;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::config::Listener;
use crate::names::{AppName, UrlPath};
use objects::{Object, object_name};
use site::{Front, ServerView};

pub use controller::{Nginx, NginxCounters, NginxHandle, live_files, live_sha256, upstream_ports};
pub use error::{Answered, NginxError, RenderError, Unconfirmed};
pub use site::{Block, CertFiles, Content, RedirectRule, RedirectTarget, Site, SiteFile};

const APP_TEMPLATE: &str = include_str!("../../templates/app.conf.tera");
const MIDDLEWARE_TEMPLATE: &str = include_str!("../../templates/middleware.conf.tera");
const HTTP_TEMPLATE: &str = include_str!("../../templates/http.conf.tera");
const MAIN_TEMPLATE: &str = include_str!("../../templates/nginx.conf.tera");

/// Seconds a client is told to wait (`Retry-After`) while an app is in maintenance.
pub const MAINTENANCE_RETRY_AFTER: u32 = 60;

/// Folder layout of keter's Nginx files under `ROOT/nginx`.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `ROOT/nginx`: the prefix of a managed Nginx.
    pub prefix: PathBuf,
    /// `ROOT/nginx/apps`: one `NAME.conf` per app.
    pub apps: PathBuf,
    pub main_conf: PathBuf,
    pub http_conf: PathBuf,
    pub generation_conf: PathBuf,
    pub control_socket: PathBuf,
    /// `ROOT/nginx/worker-files/requests.log`: Nginx logs a line per request there, keter
    /// reads it (`crate::requests::tailer`).
    pub requests_log: PathBuf,
    /// Certificates keter writes itself (a listener's certificate with its chain appended).
    pub certs: PathBuf,
    /// `ROOT/nginx/worker-files`: the files Nginx's workers read while serving (the
    /// operator's response pages in `responses/`, password files in `apps/NAME/`). Readable
    /// by the workers' group, not by others (the controller sets the group).
    pub worker_files: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Paths {
        let prefix = root.join("nginx");
        Paths {
            apps: prefix.join("apps"),
            main_conf: prefix.join("nginx.conf"),
            http_conf: prefix.join("http.conf"),
            generation_conf: prefix.join("generation.conf"),
            control_socket: prefix.join("control.sock"),
            requests_log: prefix.join("worker-files").join("requests.log"),
            certs: prefix.join("certs"),
            worker_files: prefix.join("worker-files"),
            prefix,
        }
    }

    pub fn app_conf(&self, app: &AppName) -> PathBuf {
        self.apps.join(format!("{app}.conf"))
    }

    /// Where an app's files for the workers go.
    pub fn app_files(&self, app: &AppName) -> PathBuf {
        self.worker_files.join("apps").join(app.as_str())
    }

    /// Where the operator's response pages go.
    pub fn responses(&self) -> PathBuf {
        self.worker_files.join("responses")
    }
}

/// Renders keter's Nginx files for one global configuration.
pub struct Renderer {
    tera: tera::Tera,
    listeners: Vec<Listener>,
    /// Per listener: the certificate files its `server` blocks use (TLS listeners only).
    listener_certs: Vec<Option<CertFiles>>,
    healthcheck_path: Option<UrlPath>,
    ip_from_header: bool,
    /// `request-metrics`: every server block logs to keter's request log. The daemon turns
    /// it off when the log's folder cannot be made.
    pub request_metrics: bool,
    default_timeout: Option<Duration>,
    external_https_port: u16,
    /// The shortest `worker_shutdown_timeout`: drain-time + 10 s, as before a bound was taken
    /// from the apps.
    shortest_shutdown: Duration,
    acme_root: PathBuf,
    paths: Paths,
    responses: crate::responses::ResponseFiles,
    /// Managed mode run by root: the (user, group) of Nginx's workers, rendered as `user`
    /// (`www-data` as Debian's Nginx runs them, or `nginx.user`; set by the daemon from
    /// `crate::isolation`). Apps run as other users, so the workers' group alone reads
    /// `worker-files/` and the static roots keter opens to it. Names come from the system's
    /// user database and are checked plain.
    pub worker_user: Option<(String, String)>,
}

#[derive(Serialize)]
struct UpstreamView {
    name: String,
    port: u16,
}

#[derive(Serialize)]
struct MetricsView {
    format: String,
    /// `VERSION|APP|DEPLOY`: a validated app name and a number.
    prefix: String,
    log: String,
}

/// A listener's default server, for the main configuration.
#[derive(Serialize)]
struct ListenView {
    listens: Vec<String>,
    /// A TLS listener (with `certificate`, or rejecting the handshake of names without one).
    tls: bool,
    certificate: Option<CertFiles>,
    session_cache: bool,
}

impl Renderer {
    pub fn new(config: &Config) -> Result<Renderer, RenderError> {
        let mut tera = tera::Tera::new();
        for (name, text) in [
            ("middleware.conf", MIDDLEWARE_TEMPLATE),
            ("app.conf", APP_TEMPLATE),
            ("http.conf", HTTP_TEMPLATE),
            ("nginx.conf", MAIN_TEMPLATE),
        ] {
            tera.add_raw_template(name, text)
                .map_err(|e| RenderError::Template {
                    name,
                    source: Arc::new(e),
                })?;
        }
        let paths = Paths::new(&config.root);
        for p in [
            &paths.prefix,
            &paths.control_socket,
            &config.acme_webroot,
            &paths.worker_files,
            &paths.requests_log,
        ] {
            crate::names::check_conf_path(p).map_err(|e| RenderError::Root {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        if !fits_sun_path(&paths.control_socket) {
            return Err(RenderError::SocketPath(paths.control_socket.clone()));
        }
        let listener_certs = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.tls.as_ref().map(|t| CertFiles {
                    certificate: if t.chain_certificates.is_empty() {
                        t.certificate.clone()
                    } else {
                        paths.certs.join(format!("listener-{i}.crt"))
                    },
                    key: t.key.clone(),
                })
            })
            .collect();
        Ok(Renderer {
            tera,
            listeners: config.listeners.clone(),
            listener_certs,
            healthcheck_path: config.healthcheck_path.clone(),
            ip_from_header: config.ip_from_header,
            // The daemon turns it off when the log's folder cannot be made (it says why).
            request_metrics: config.request_metrics,
            default_timeout: config.connection_time_bound,
            external_https_port: config.external_https_port,
            shortest_shutdown: config.drain_time + Duration::from_secs(10),
            acme_root: config.acme_webroot.clone(),
            paths,
            responses: config.responses.clone(),
            worker_user: None,
        })
    }

    /// The global `connection-time-bound`, which a stanza without its own gets.
    pub fn default_bound(&self) -> Option<Duration> {
        self.default_timeout
    }

    /// The operator's response pages, to write into `worker-files/responses/`.
    pub fn response_pages(&self) -> Vec<(&'static str, &[u8])> {
        self.responses.pages()
    }

    /// Certificate files keter must write before Nginx reads its configuration: a TLS
    /// listener's certificate followed by its chain, as `ssl_certificate` wants them.
    pub fn listener_cert_bundles(&self) -> Vec<(PathBuf, Vec<PathBuf>)> {
        self.listeners
            .iter()
            .zip(&self.listener_certs)
            .filter_map(|(l, cert)| {
                let tls = l.tls.as_ref()?;
                let cert = cert.as_ref()?;
                if tls.chain_certificates.is_empty() {
                    return None;
                }
                let mut inputs = vec![tls.certificate.clone()];
                inputs.extend(tls.chain_certificates.iter().cloned());
                Some((cert.certificate.clone(), inputs))
            })
            .collect()
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The file `ROOT/nginx/apps/NAME.conf` for `site` at Nginx generation `generation`.
    pub fn app_conf(&self, site: &Site, generation: u64) -> Result<String, RenderError> {
        let front = Front {
            listeners: &self.listeners,
            listener_certs: &self.listener_certs,
            external_https_port: self.external_https_port,
            proxy_exception_page: self.responses.proxy_exception.is_some(),
        };
        let webapps = site
            .blocks
            .iter()
            .filter(|b| matches!(b.content, Content::App { .. }))
            .count();
        let files = self.paths.app_files(&site.app);
        let mut decl = middleware::Declarations::default();
        let mut upstreams = Vec::new();
        let mut servers: Vec<ServerView> = Vec::new();
        for block in &site.blocks {
            let upstream = match block.content {
                Content::App { port, .. } => {
                    let object = if webapps == 1 {
                        Object::Upstream
                    } else {
                        Object::NthUpstream(upstreams.len() + 1)
                    };
                    let name = object_name(&site.app, object);
                    upstreams.push(UpstreamView {
                        name: name.clone(),
                        port,
                    });
                    Some(name)
                }
                _ => None,
            };
            let proxied = matches!(
                block.content,
                Content::App { .. } | Content::ReverseProxy { .. }
            );
            let auth_file = block
                .auth_file
                .as_ref()
                .map(|f| files.join(f).display().to_string());
            let location =
                middleware::location(&site.app, &block.middleware, auth_file, proxied, &mut decl)?;
            servers.extend(site::servers(block, upstream.as_deref(), &location, &front));
        }
        let mut ctx = tera::Context::new();
        ctx.insert("app", &site.app);
        ctx.insert("bundle", &site.bundle);
        ctx.insert("sha256", &site.sha256);
        ctx.insert("deploy", &site.deploy);
        ctx.insert("generation", &generation);
        ctx.insert("upstreams", &upstreams);
        ctx.insert("zones", &decl.zones);
        ctx.insert("maps", &decl.maps);
        ctx.insert("servers", &servers);
        ctx.insert("healthcheck_path", &self.healthcheck_path);
        ctx.insert("acme_root", &self.acme_root);
        ctx.insert("ip_from_header", &self.ip_from_header);
        ctx.insert("responses_dir", &self.paths.responses());
        ctx.insert("metrics", &self.metrics_view(site));
        ctx.insert(
            "maintenance",
            &site.maintenance.as_ref().map(|f| {
                serde_json::json!({
                    "dir": files.display().to_string(),
                    "file": f,
                    "retry_after": MAINTENANCE_RETRY_AFTER,
                })
            }),
        );
        self.render("app.conf", &ctx)
    }

    /// What an app's file needs for request metrics (README, "Request metrics"): its own
    /// `log_format`, whose lines start with the format's version, the app and the deploy
    /// number (`crate::requests::line`), and the log.
    fn metrics_view(&self, site: &Site) -> Option<MetricsView> {
        self.request_metrics.then(|| MetricsView {
            format: object_name(&site.app, Object::LogFormat),
            prefix: format!(
                "{}|{}|{}",
                crate::requests::line::VERSION,
                site.app,
                site.deploy
            ),
            log: self.paths.requests_log.display().to_string(),
        })
    }

    /// `ROOT/nginx/http.conf`: shared maps and the control server, included in the http
    /// context of the managed main configuration or, in system mode, of the host's.
    pub fn http_conf(&self) -> Result<String, RenderError> {
        let mut ctx = tera::Context::new();
        ctx.insert("control_socket", &self.paths.control_socket);
        ctx.insert("generation_file", &self.paths.generation_conf);
        ctx.insert("apps_dir", &self.paths.apps);
        self.render("http.conf", &ctx)
    }

    /// `ROOT/nginx/nginx.conf` of a managed Nginx. `longest` is the longest
    /// `connection-time-bound` of the apps Nginx serves (`None`: one has none): a worker that
    /// a reload retires keeps serving its open connections (websockets, server-sent events,
    /// long downloads, of every app) that long, so that one app's deploy never cuts another
    /// app's connection before its own bound (README, "Neighbours and Nginx reloads").
    pub fn main_conf(&self, longest: Option<Duration>) -> Result<String, RenderError> {
        // One default server per address: two listeners may share one (`*` and `*4`).
        let mut seen: Vec<String> = Vec::new();
        let listens: Vec<ListenView> = self
            .listeners
            .iter()
            .zip(&self.listener_certs)
            .filter_map(|(l, cert)| {
                let listens: Vec<String> = l
                    .nginx_addresses()
                    .into_iter()
                    .filter(|a| !seen.contains(a))
                    .collect();
                seen.extend(listens.iter().cloned());
                (!listens.is_empty()).then(|| ListenView {
                    listens: listens
                        .into_iter()
                        .map(|a| {
                            if l.is_tls() {
                                format!("{a} ssl http2")
                            } else {
                                a
                            }
                        })
                        .collect(),
                    tls: l.is_tls(),
                    certificate: cert.clone(),
                    session_cache: l.session,
                })
            })
            .collect();
        let mut ctx = tera::Context::new();
        ctx.insert("prefix", &self.paths.prefix);
        ctx.insert("listeners", &listens);
        ctx.insert("acme_root", &self.acme_root);
        let worker_user = self.worker_user.as_ref().filter(|(u, g)| {
            crate::isolation::users::is_plain_name(u) && crate::isolation::users::is_plain_name(g)
        });
        ctx.insert("worker_user", &worker_user.map(|(u, g)| format!("{u} {g}")));
        ctx.insert("responses_dir", &self.paths.responses());
        ctx.insert("unknown_host_page", &self.responses.unknown_host.is_some());
        ctx.insert("missing_host_page", &self.responses.missing_host.is_some());
        ctx.insert(
            "worker_shutdown_timeout",
            &site::nginx_time(longest.map(|b| b.max(self.shortest_shutdown))),
        );
        self.render("nginx.conf", &ctx)
    }

    /// `ROOT/nginx/generation.conf`: the control server answers the generation and the pid
    /// of the worker that answered (whose parent tells which master runs it).
    pub fn generation_conf(generation: u64) -> String {
        format!("return 200 \"{generation} $pid\\n\";\n")
    }

    fn render(&self, name: &'static str, ctx: &tera::Context) -> Result<String, RenderError> {
        self.tera
            .render(name, ctx)
            .map_err(|e| RenderError::Render {
                name,
                source: Arc::new(e),
            })
    }
}

/// A unix socket path fits `sun_path`: 108 bytes including the terminating NUL.
pub fn fits_sun_path(path: &Path) -> bool {
    path.as_os_str().len() <= 107
}

/// Golden files: the exact text of every kind of block, in `tests/golden/`, so reviewers can
/// read what keter writes. `KETER_BLESS=1 cargo test golden` rewrites them; the integration
/// tests check each with `nginx -t`.
#[cfg(test)]
mod golden;
