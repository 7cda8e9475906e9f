//! The golden files' cases: every kind of block keter writes, rendered from fixed sites.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::bundle::middleware::{
    BasicAuth, HeaderName, Identifier, LocalOnly, Middlewares, NginxString, Rate, Throttle, Zone,
};
use crate::names::{Host, Hostname, RedirectUrl};

const BASE_CONFIG: &str = "root: /srv/keter\nlisteners: [{host: 127.0.0.1, port: 8080}]\n";
const TLS_CONFIG: &str = "root: /srv/keter\nexternal-https-port: 8443\nlisteners:\n  - {host: 127.0.0.1, port: 8080}\n  - {host: 127.0.0.1, port: 8443, key: /srv/keter/tls/key.pem, certificate: /srv/keter/tls/cert.pem}\n";
/// A TLS listener without a certificate of its own, for stanzas that bring one (ACME).
const BARE_TLS_CONFIG: &str = "root: /srv/keter\nexternal-https-port: 8443\nlisteners:\n  - {host: 127.0.0.1, port: 8080}\n  - {host: 127.0.0.1, port: 8443, tls: true}\n";

fn renderer(yaml: &str) -> Renderer {
    let (config, problems) = Config::parse(yaml, Path::new("/"), "golden.yaml");
    assert!(problems.errors.is_empty(), "{:?}", problems.errors);
    let mut r = Renderer::new(&config.unwrap()).unwrap();
    // The same text whoever runs the tests.
    r.worker_user = Some(("www-data".into(), "www-data".into()));
    r
}

fn hosts(names: &[&str]) -> Vec<Host> {
    names.iter().map(|h| Host::new(h).unwrap()).collect()
}

fn site(blocks: Vec<Block>) -> Site {
    Site {
        app: AppName::new("demo").unwrap(),
        bundle: "demo.keter".into(),
        sha256: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
        deploy: 3,
        blocks,
        files: Vec::new(),
        maintenance: None,
    }
}

fn block(names: &[&str], content: Content) -> Block {
    Block {
        hosts: hosts(names),
        content,
        certificate: None,
        acme: false,
        requires_secure: false,
        max_body: 0,
        middleware: Middlewares::default(),
        auth_file: None,
    }
}

fn app(port: u16, names: &[&str]) -> Block {
    block(
        names,
        Content::App {
            port,
            timeout: Some(Duration::from_secs(300)),
        },
    )
}

fn every_middleware() -> Middlewares {
    let header = |n: &str| HeaderName::new(n).unwrap();
    let text = |t: &str| NginxString::new(t).unwrap();
    Middlewares {
        headers: vec![(header("Access-Control-Allow-Origin"), text("*"))],
        basic_auth: Some(BasicAuth {
            realm: text("Keter Basic Auth"),
            users: vec![("jon".into(), "rocks".into())],
        }),
        local: Some(LocalOnly {
            status: 405,
            message: text("Keter Rocks (local status message)"),
        }),
        throttles: vec![
            Throttle {
                name: "ip".into(),
                limit: 4,
                period: 5,
                rate: Rate::PerMinute(48),
                identifier: Identifier::Ip,
                zone: Zone::Default,
            },
            // One request per period: no burst, which Nginx writes without `burst=`.
            Throttle {
                name: "one".into(),
                limit: 1,
                period: 60,
                rate: Rate::PerMinute(1),
                identifier: Identifier::Ip,
                zone: Zone::Default,
            },
            Throttle {
                name: "api/key".into(),
                limit: 1000,
                period: 3600,
                rate: Rate::PerMinute(17),
                identifier: Identifier::Header(header("X-Api-Key")),
                zone: Zone::Header(header("X-Tenant-ID")),
            },
        ],
        autohead: true,
    }
}

pub(crate) fn cases() -> Vec<(&'static str, String)> {
    let plain = renderer(BASE_CONFIG);
    let tls = renderer(TLS_CONFIG);
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
    // A root in the bundle, and one under an `allowed-static-roots` folder (`/srv/www`).
    add(
        "static-files",
        &plain,
        site(vec![
            block(
                &["static.example.com"],
                Content::Static {
                    root: PathBuf::from("/srv/keter/temp/demo-3/static"),
                    symlinks_from: Some(PathBuf::from("/srv/keter/temp/demo-3")),
                    listing: true,
                    send_timeout: Some(Some(Duration::from_secs(30))),
                },
            ),
            block(
                &["docs.example.com"],
                Content::Static {
                    root: PathBuf::from("/srv/www/docs"),
                    symlinks_from: Some(PathBuf::from("/srv/www")),
                    listing: false,
                    send_timeout: None,
                },
            ),
        ]),
    );
    add(
        "redirect",
        &plain,
        site(vec![block(
            &["example.com", "old.example.com"],
            Content::Redirect {
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
                            host: Hostname::new("WWW.Example.com").unwrap().into(),
                            port: Some(8443),
                        },
                    },
                ],
            },
        )]),
    );
    add(
        "reverse-proxy",
        &plain,
        site(vec![block(
            &["api.example.com"],
            Content::ReverseProxy {
                https: false,
                host: "127.0.0.1".into(),
                port: 9000,
                preserve_host: true,
                timeout: Some(Duration::from_secs(30)),
            },
        )]),
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
    // `ssl: acme` with requires-secure: before its certificate plain HTTP only (no redirect,
    // no TLS server with the listener's certificate); after, the TLS server with the ACME
    // file as both key and certificate, and the redirect.
    let mut waiting = app(4008, &["shop.example.com", "www.shop.example.com"]);
    waiting.acme = true;
    waiting.requires_secure = true;
    let mut obtained = waiting.clone();
    obtained.certificate = Some(CertFiles {
        certificate: PathBuf::from("/srv/keter/etc/acme/certs/shop.example.com-1a2b3c4d.pem"),
        key: PathBuf::from("/srv/keter/etc/acme/certs/shop.example.com-1a2b3c4d.pem"),
    });
    let bare_tls = renderer(BARE_TLS_CONFIG);
    add("acme-before-certificate", &bare_tls, site(vec![waiting]));
    add("acme-with-certificate", &bare_tls, site(vec![obtained]));
    let bare_main = bare_tls.main_conf(Some(Duration::from_secs(300))).unwrap();
    // Every middleware Nginx does, on a webapp and a static-files stanza, with a body limit.
    let mut with_mw = app(4006, &["mw.example.com"]);
    with_mw.middleware = every_middleware();
    with_mw.auth_file = Some("0123456789abcdef01234567.htpasswd".into());
    with_mw.max_body = 10 << 20;
    let mut static_mw = block(
        &["files.example.com"],
        Content::Static {
            root: PathBuf::from("/srv/keter/temp/demo-3/static"),
            symlinks_from: Some(PathBuf::from("/srv/keter/temp/demo-3")),
            listing: false,
            send_timeout: None,
        },
    );
    static_mw.middleware = every_middleware();
    static_mw.auth_file = Some("0123456789abcdef01234567.htpasswd".into());
    let pages = std::env::temp_dir().join(format!("keter-golden-pages-{}", std::process::id()));
    std::fs::create_dir_all(&pages).unwrap();
    std::fs::write(pages.join("page.html"), "<h1>keter</h1>\n").unwrap();
    add(
        "middleware",
        &renderer(&format!(
            "{BASE_CONFIG}proxy-exception-response-file: {}/page.html\n",
            pages.display()
        )),
        site(vec![with_mw, static_mw]),
    );
    // Hosts with a port (Keter's `127.0.0.1:8000`), beside one without; listeners in Warp's
    // forms with TLS session resumption.
    add(
        "hosts-with-ports-and-listener-forms",
        &renderer(
            "root: /srv/keter\nlisteners:\n  - {host: \"!4\", port: 8080}\n  - {host: \"!6\", port: 8080}\n  - {host: \"!4\", port: 8443, key: /srv/keter/tls/key.pem, certificate: /srv/keter/tls/cert.pem, session: true}\n",
        ),
        site(vec![app(
            4007,
            &[
                "www.example.com",
                "127.0.0.1:8000",
                "localhost:8000",
                "*.local.example.com:8080",
            ],
        )]),
    );
    out.push(("main-managed-tls-without-certificate", bare_main));
    out.push((
        "main-managed-tls",
        tls.main_conf(Some(Duration::from_secs(300))).unwrap(),
    ));
    out.push((
        "main-managed-response-pages",
        renderer(&format!(
            "root: /srv/keter\nlisteners:\n  - {{host: \"!4\", port: 8080}}\n  - {{host: \"!6\", port: 8080}}\n  - {{host: \"!4\", port: 8443, key: /srv/keter/tls/key.pem, certificate: /srv/keter/tls/cert.pem, session: true}}\nunknown-host-response-file: {p}/page.html\nmissing-host-response-file: {p}/page.html\n",
            p = pages.display()
        ))
        .main_conf(Some(Duration::from_secs(300)))
        .unwrap(),
    ));
    let _ = std::fs::remove_dir_all(&pages);
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
