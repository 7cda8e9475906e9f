//! Nginx: rendering keter's configuration files from the Tera templates in `templates/`
//! ([`Renderer`]), and the controller that alone writes them and signals Nginx
//! ([`controller`]).
//!
//! Templates only ever receive validated values (`AppName`, `Hostname`, ports, checked
//! paths): `.conf` output is not escaped, so nothing unvalidated may reach it.

pub mod controller;
pub mod site;
pub mod system;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::config::Listener;
use crate::names::{AppName, UrlPath};
use site::{Front, ServerView};

pub use controller::{Nginx, NginxCounters, NginxError, NginxHandle};
pub use site::{Block, CertFiles, Content, RedirectRule, RedirectTarget, Site};

const APP_TEMPLATE: &str = include_str!("../../templates/app.conf.tera");
const HTTP_TEMPLATE: &str = include_str!("../../templates/http.conf.tera");
const MAIN_TEMPLATE: &str = include_str!("../../templates/nginx.conf.tera");

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
    /// Certificates keter writes itself (a listener's certificate with its chain appended).
    pub certs: PathBuf,
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
            certs: prefix.join("certs"),
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
    listeners: Vec<Listener>,
    /// Per listener: the certificate files its `server` blocks use (TLS listeners only).
    listener_certs: Vec<Option<CertFiles>>,
    healthcheck_path: Option<UrlPath>,
    ip_from_header: bool,
    default_timeout: Option<Duration>,
    external_https_port: u16,
    worker_shutdown_timeout: Duration,
    acme_root: PathBuf,
    paths: Paths,
    /// Managed mode run by root: the (user, group) of Nginx's workers, rendered as `user`.
    /// Names come from the system's user database and are checked plain.
    pub worker_user: Option<(String, String)>,
}

#[derive(Serialize)]
struct UpstreamView {
    name: String,
    port: u16,
}

/// A TLS listener's default server, for the main configuration.
#[derive(Serialize)]
struct ListenView {
    listen: String,
    certificate: Option<CertFiles>,
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
        for p in [&paths.prefix, &paths.control_socket, &config.acme_webroot] {
            crate::names::check_conf_path(p).map_err(|e| format!("root: {e}"))?;
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if paths.control_socket.as_os_str().len() > 107 {
            return Err(format!(
                "root: {} is too long a path for a unix socket (at most 107 bytes)",
                paths.control_socket.display()
            ));
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
            default_timeout: config.connection_time_bound,
            external_https_port: config.external_https_port,
            worker_shutdown_timeout: config.drain_time + Duration::from_secs(10),
            acme_root: config.acme_webroot.clone(),
            paths,
            worker_user: None,
        })
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
    pub fn app_conf(&self, site: &Site, generation: u64) -> Result<String, String> {
        let front = Front {
            listeners: &self.listeners,
            listener_certs: &self.listener_certs,
            external_https_port: self.external_https_port,
            default_timeout: self.default_timeout,
        };
        let webapps = site
            .blocks
            .iter()
            .filter(|b| matches!(b.content, Content::App { .. }))
            .count();
        let mut upstreams = Vec::new();
        let mut servers: Vec<ServerView> = Vec::new();
        for block in &site.blocks {
            let upstream = match block.content {
                Content::App { port, .. } => {
                    let name = site::upstream_name(&site.app, upstreams.len(), webapps);
                    upstreams.push(UpstreamView {
                        name: name.clone(),
                        port,
                    });
                    Some(name)
                }
                _ => None,
            };
            servers.extend(site::servers(block, upstream.as_deref(), &front));
        }
        let mut ctx = tera::Context::new();
        ctx.insert("app", &site.app);
        ctx.insert("bundle", &site.bundle);
        ctx.insert("sha256", &site.sha256);
        ctx.insert("deploy", &site.deploy);
        ctx.insert("generation", &generation);
        ctx.insert("upstreams", &upstreams);
        ctx.insert("servers", &servers);
        ctx.insert("healthcheck_path", &self.healthcheck_path);
        ctx.insert("acme_root", &self.acme_root);
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
        let listens: Vec<ListenView> = self
            .listeners
            .iter()
            .zip(&self.listener_certs)
            .map(|(l, cert)| ListenView {
                listen: match cert {
                    Some(_) => format!("{} ssl http2", l.nginx_address()),
                    None => l.nginx_address(),
                },
                certificate: cert.clone(),
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
        ctx.insert(
            "worker_shutdown_timeout",
            &site::nginx_time(Some(self.worker_shutdown_timeout)),
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

/// Golden files: the exact text of every kind of block, in `tests/golden/`, so reviewers can
/// read what keter writes. `KETER_BLESS=1 cargo test golden` rewrites them; the integration
/// tests check each with `nginx -t`.
#[cfg(test)]
mod golden {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::names::{Hostname, RedirectUrl};

    const BASE_CONFIG: &str = "root: /srv/keter\nlisteners: [{host: 127.0.0.1, port: 8080}]\n";
    const TLS_CONFIG: &str = "root: /srv/keter\nexternal-https-port: 8443\nlisteners:\n  - {host: 127.0.0.1, port: 8080}\n  - {host: 127.0.0.1, port: 8443, key: /srv/keter/tls/key.pem, certificate: /srv/keter/tls/cert.pem}\n";

    fn renderer(yaml: &str) -> Renderer {
        let (config, problems) = Config::parse(yaml, Path::new("/"), "golden.yaml");
        assert!(problems.errors.is_empty(), "{:?}", problems.errors);
        Renderer::new(&config.unwrap()).unwrap()
    }

    fn hosts(names: &[&str]) -> Vec<Hostname> {
        names.iter().map(|h| Hostname::new(h).unwrap()).collect()
    }

    fn site(blocks: Vec<Block>) -> Site {
        Site {
            app: AppName::new("demo").unwrap(),
            bundle: "demo.keter".into(),
            sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            deploy: 3,
            blocks,
        }
    }

    fn app(port: u16, names: &[&str]) -> Block {
        Block {
            hosts: hosts(names),
            content: Content::App {
                port,
                timeout: Some(Duration::from_secs(300)),
            },
            certificate: None,
            requires_secure: false,
        }
    }

    pub(crate) fn cases() -> Vec<(&'static str, String)> {
        let plain = renderer(BASE_CONFIG);
        let mut tls = renderer(TLS_CONFIG);
        tls.worker_user = Some(("www-data".into(), "www-data".into()));
        let health = renderer(&format!("{BASE_CONFIG}healthcheck-path: /keter-health\n"));
        let mut out = Vec::new();
        let mut add = |name: &'static str, r: &Renderer, s: Site| {
            out.push((name, r.app_conf(&s, 7).unwrap()));
        };
        add(
            "webapp",
            &plain,
            site(vec![app(4000, &["www.example.com", "example.com"])]),
        );
        let mut unbounded = app(4001, &["*.example.com", "bar.*.*.example.org"]);
        unbounded.content = Content::App {
            port: 4001,
            timeout: None,
        };
        add(
            "webapp-wildcards-no-time-bound",
            &health,
            site(vec![unbounded]),
        );
        add(
            "two-webapps",
            &plain,
            site(vec![
                app(4002, &["a.example.com"]),
                app(4003, &["b.example.com"]),
            ]),
        );
        add(
            "static-files",
            &plain,
            site(vec![Block {
                hosts: hosts(&["static.example.com"]),
                content: Content::Static {
                    root: PathBuf::from("/srv/keter/temp/demo-3/static"),
                    listing: true,
                },
                certificate: None,
                requires_secure: false,
            }]),
        );
        add(
            "redirect",
            &plain,
            site(vec![Block {
                hosts: hosts(&["example.com", "old.example.com"]),
                content: Content::Redirect {
                    status: 303,
                    rules: vec![
                        RedirectRule {
                            path: Some(UrlPath::new("/docs").unwrap()),
                            target: RedirectTarget::Url {
                                url: RedirectUrl::new("https://docs.example.com/").unwrap(),
                            },
                        },
                        RedirectRule {
                            path: None,
                            target: RedirectTarget::Host {
                                secure: true,
                                host: Hostname::new("www.example.com").unwrap(),
                                port: Some(8443),
                            },
                        },
                    ],
                },
                certificate: None,
                requires_secure: false,
            }]),
        );
        add(
            "reverse-proxy",
            &plain,
            site(vec![Block {
                hosts: hosts(&["api.example.com"]),
                content: Content::ReverseProxy {
                    https: false,
                    host: "127.0.0.1".into(),
                    port: 9000,
                    preserve_host: true,
                    timeout: Some(Duration::from_secs(30)),
                },
                certificate: None,
                requires_secure: false,
            }]),
        );
        let mut secure = app(4004, &["secure.example.com"]);
        secure.requires_secure = true;
        let mut own = app(4005, &["own-cert.example.com"]);
        own.certificate = Some(CertFiles {
            certificate: PathBuf::from("/srv/keter/etc/certs/demo-3/certificate.pem"),
            key: PathBuf::from("/srv/keter/etc/certs/demo-3/key.pem"),
        });
        add(
            "tls-requires-secure-and-own-certificate",
            &tls,
            site(vec![secure, own]),
        );
        out.push(("main-managed-tls", tls.main_conf().unwrap()));
        out
    }

    #[test]
    fn golden_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let bless = std::env::var_os("KETER_BLESS").is_some();
        for (name, text) in cases() {
            let path = dir.join(format!("{name}.conf"));
            if bless {
                std::fs::write(&path, &text).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (KETER_BLESS=1 writes it)", path.display()));
            assert_eq!(text, expected, "{name} differs from {}", path.display());
        }
    }
}
