//! Nginx: rendering keter's configuration files from the Tera templates in `templates/`
//! ([`Renderer`]), and the controller that alone writes them and signals Nginx
//! ([`controller`]).
//!
//! Templates only ever receive validated values (`AppName`, `Hostname`, ports, checked
//! paths): `.conf` output is not escaped, so nothing unvalidated may reach it.

pub mod controller;
pub mod system;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::names::{AppName, Hostname, UrlPath};

pub use controller::{Nginx, NginxError};

const APP_TEMPLATE: &str = include_str!("../../templates/app.conf.tera");
const HTTP_TEMPLATE: &str = include_str!("../../templates/http.conf.tera");
const MAIN_TEMPLATE: &str = include_str!("../../templates/nginx.conf.tera");

/// What an app asks Nginx to serve: one upstream per webapp stanza.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Site {
    pub app: AppName,
    /// Bundle file name (the app name plus `.keter`).
    pub bundle: String,
    /// Hex SHA-256 of the bundle.
    pub sha256: String,
    /// Deploy number of this app within this daemon run.
    pub deploy: u64,
    pub upstreams: Vec<Upstream>,
}

/// One webapp stanza behind Nginx.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Upstream {
    pub port: u16,
    pub hosts: Vec<Hostname>,
    /// Per-request bound; `None` for none.
    pub timeout: Option<Duration>,
}

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
            prefix,
        }
    }

    pub fn app_conf(&self, app: &AppName) -> PathBuf {
        self.apps.join(format!("{app}.conf"))
    }
}

/// Renders keter's Nginx files for one global configuration.
pub struct Renderer {
    tera: tera::Tera,
    listeners: Vec<String>,
    healthcheck_path: Option<UrlPath>,
    ip_from_header: bool,
    default_timeout: Option<Duration>,
    worker_shutdown_timeout: Duration,
    paths: Paths,
}

#[derive(Serialize)]
struct UpstreamView<'a> {
    name: String,
    port: u16,
    hosts: &'a [Hostname],
    timeout: String,
}

impl Renderer {
    pub fn new(config: &Config) -> Result<Renderer, String> {
        let mut tera = tera::Tera::new();
        for (name, text) in [
            ("app.conf", APP_TEMPLATE),
            ("http.conf", HTTP_TEMPLATE),
            ("nginx.conf", MAIN_TEMPLATE),
        ] {
            tera.add_raw_template(name, text)
                .map_err(|e| format!("template {name}: {e}"))?;
        }
        let paths = Paths::new(&config.root);
        for p in [&paths.prefix, &paths.control_socket] {
            crate::names::check_conf_path(p).map_err(|e| format!("root: {e}"))?;
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if paths.control_socket.as_os_str().len() > 107 {
            return Err(format!(
                "root: {} is too long a path for a unix socket (at most 107 bytes)",
                paths.control_socket.display()
            ));
        }
        Ok(Renderer {
            tera,
            listeners: config.listeners.iter().map(|l| l.nginx_address()).collect(),
            healthcheck_path: config.healthcheck_path.clone(),
            ip_from_header: config.ip_from_header,
            default_timeout: config.connection_time_bound,
            worker_shutdown_timeout: config.drain_time + Duration::from_secs(10),
            paths,
        })
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The file `ROOT/nginx/apps/NAME.conf` for `site` at Nginx generation `generation`.
    pub fn app_conf(&self, site: &Site, generation: u64) -> Result<String, String> {
        let upstreams: Vec<UpstreamView> = site
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| UpstreamView {
                name: if site.upstreams.len() == 1 {
                    format!("keter-{}", site.app)
                } else {
                    format!("keter-{}-{}", site.app, i + 1)
                },
                port: u.port,
                hosts: &u.hosts,
                timeout: nginx_time(u.timeout.or(self.default_timeout)),
            })
            .collect();
        let mut ctx = tera::Context::new();
        ctx.insert("app", &site.app);
        ctx.insert("bundle", &site.bundle);
        ctx.insert("sha256", &site.sha256);
        ctx.insert("deploy", &site.deploy);
        ctx.insert("generation", &generation);
        ctx.insert("upstreams", &upstreams);
        ctx.insert("listeners", &self.listeners);
        ctx.insert("healthcheck_path", &self.healthcheck_path);
        ctx.insert("ip_from_header", &self.ip_from_header);
        self.render("app.conf", &ctx)
    }

    /// `ROOT/nginx/http.conf`: shared maps and the control server, included in the http
    /// context of the managed main configuration or, in system mode, of the host's.
    pub fn http_conf(&self) -> Result<String, String> {
        let mut ctx = tera::Context::new();
        ctx.insert("control_socket", &self.paths.control_socket);
        ctx.insert("generation_file", &self.paths.generation_conf);
        ctx.insert("apps_dir", &self.paths.apps);
        self.render("http.conf", &ctx)
    }

    /// `ROOT/nginx/nginx.conf` of a managed Nginx.
    pub fn main_conf(&self) -> Result<String, String> {
        let mut ctx = tera::Context::new();
        ctx.insert("prefix", &self.paths.prefix);
        ctx.insert("listeners", &self.listeners);
        ctx.insert(
            "worker_shutdown_timeout",
            &nginx_time(Some(self.worker_shutdown_timeout)),
        );
        self.render("nginx.conf", &ctx)
    }

    /// `ROOT/nginx/generation.conf`: the control server answers the generation and the pid
    /// of the worker that answered (whose parent tells which master runs it).
    pub fn generation_conf(generation: u64) -> String {
        format!("return 200 \"{generation} $pid\\n\";\n")
    }

    fn render(&self, name: &str, ctx: &tera::Context) -> Result<String, String> {
        self.tera
            .render(name, ctx)
            .map_err(|e| format!("rendering {name}: {e}"))
    }
}

/// An Nginx time value in milliseconds; no bound is rendered as a year.
fn nginx_time(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{}ms", d.as_millis().max(1)),
        None => "365d".to_string(),
    }
}
