//! The status interface's HTML pages, rendered from the Tera templates in `templates/status/`
//! with autoescaping on: every value from an app (hosts, log lines, error messages) and from
//! the request (the Host header, the path) is escaped (Keter #246 was an XSS through the Host
//! header). Only keter's own stylesheet and script are inserted as they are, and the page's
//! Content-Security-Policy allows exactly those two by hash, so even a value that escaped
//! escaping could not run.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::report::{AppReport, AppState, rfc3339};

const LAYOUT: &str = include_str!("../../templates/status/layout.html");
const OVERVIEW: &str = include_str!("../../templates/status/overview.html");
const APP: &str = include_str!("../../templates/status/app.html");
const NOT_FOUND: &str = include_str!("../../templates/status/not_found.html");
const CSS: &str = include_str!("../../templates/status/style.css");
const SCRIPT: &str = include_str!("../../templates/status/log.js");

/// Log lines shown on an app page (and served by its JSON log endpoint by default).
pub const LOG_LINES: usize = 200;

/// A template that failed to compile or render (a bug in keter, not in an app).
#[derive(Debug)]
pub struct PageError(String);

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PageError {}

/// The compiled templates and what every page shows in its header.
pub struct Pages {
    tera: tera::Tera,
    /// The machine's host name (from the kernel, not from the request).
    machine: String,
    /// Port appended to host links when the front end is not on 80.
    http_port: u16,
    csp: String,
}

/// Facts about one app, formatted for display.
#[derive(Debug, Serialize)]
struct AppView {
    name: String,
    state: &'static str,
    sha256: String,
    sha_short: String,
    bundle_time: String,
    deploy: String,
    since: String,
    hosts: Vec<HostLink>,
    ports: String,
    pids: String,
    uptime: String,
    restarts: u64,
    deploy_result: &'static str,
    /// The kind of a failed deploy, and when it is tried again (empty when it is not).
    deploy_kind: &'static str,
    deploy_retry: String,
    deploy_duration: String,
    deploy_finished: String,
    last_error: String,
    /// Automatic rollback: the release watched, or the last one rolled back by keter.
    auto_rollback: String,
    log_lines_dropped: u64,
    draining: usize,
    processes: Vec<ProcessView>,
    /// The `ssl: acme` stanzas' certificates.
    certificates: Vec<CertView>,
    /// The request rate over the last hour (inline SVG drawn by `crate::requests::plot`),
    /// empty before the app's first request.
    spark: String,
}

/// The request metrics part of an app page (README, "Request metrics"): the plots as inline
/// SVG, drawn by keter from numbers (`crate::requests::plot`), and a summary.
#[derive(Debug, Serialize)]
pub struct Traffic {
    pub hour: String,
    pub day: String,
    /// Requests since keter started, by class, and the latency quantiles.
    pub summary: String,
}

impl Traffic {
    /// The plots of `app` as of unix time `now`, with its events; `None` before its first
    /// request.
    pub fn of(reports: &crate::report::Reports, app: &str, now: u64) -> Option<Traffic> {
        use crate::requests::{DAY, HOUR, plot};
        let marks = reports.events(app);
        let hour = reports.requests.series(app, HOUR, now)?;
        let day = reports.requests.series(app, DAY, now)?;
        let summary = reports
            .requests
            .summary(app, now)
            .map(|s| {
                let by_class: Vec<String> = s
                    .total
                    .by_class
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                format!(
                    "{} requests since keter started ({}), {} req/s and {} errors/s over the last minute",
                    s.total.requests,
                    by_class.join(", "),
                    s.requests_per_second,
                    s.errors_per_second
                )
            })
            .unwrap_or_default();
        Some(Traffic {
            hour: plot::charts("hour", &hour, HOUR, &marks),
            day: plot::charts("day", &day, DAY, &marks),
            summary,
        })
    }
}

/// One certificate over ACME, formatted for display.
#[derive(Debug, Serialize)]
struct CertView {
    hosts: String,
    state: &'static str,
    valid_until: String,
    renew_at: String,
    next_attempt: String,
    failures: u32,
    /// `kind: message` of the last failed attempt, empty after a success.
    error: String,
}

#[derive(Debug, Serialize)]
struct HostLink {
    name: String,
    /// Empty for a wildcard host, which has no single address to link to.
    href: String,
}

#[derive(Debug, Serialize)]
struct ProcessView {
    kind: &'static str,
    stanza: usize,
    port: String,
    pid: String,
    restarts: u64,
    /// A webapp's health while it serves; `None` for a background process.
    health: Option<&'static str>,
    health_latency_ms: Option<u64>,
    health_failures: u32,
    health_error: Option<String>,
    health_replacements: u64,
    cpu: String,
    memory: String,
    tasks: String,
    oom_kills: String,
}

#[derive(Debug, Serialize)]
struct StateCount {
    state: &'static str,
    count: usize,
}

impl Pages {
    pub fn new(http_port: u16) -> Result<Pages, PageError> {
        let mut tera = tera::Tera::new();
        tera.add_raw_templates([
            ("layout.html", LAYOUT),
            ("overview.html", OVERVIEW),
            ("app.html", APP),
            ("not_found.html", NOT_FOUND),
        ])
        .map_err(|e| PageError(format!("status page templates: {e}")))?;
        // Set explicitly rather than relying on the default suffixes: these pages must escape.
        tera.autoescape_on([".html"]);
        let csp = format!(
            "default-src 'none'; style-src '{}'; script-src '{}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            sha256_source(CSS),
            sha256_source(SCRIPT)
        );
        Ok(Pages {
            tera,
            machine: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "this machine".into()),
            http_port,
            csp,
        })
    }

    /// The Content-Security-Policy header value for every page.
    pub fn csp(&self) -> &str {
        &self.csp
    }

    /// The page listing every app; `spark` gives an app's request rate line.
    pub fn overview(
        &self,
        apps: &[AppReport],
        spark: impl Fn(&str) -> Option<String>,
    ) -> Result<String, PageError> {
        let counts: Vec<StateCount> = AppState::ALL
            .iter()
            .map(|s| StateCount {
                state: s.as_str(),
                count: apps.iter().filter(|a| a.state == *s).count(),
            })
            .filter(|c| c.count > 0 || c.state == "running")
            .collect();
        let views: Vec<AppView> = apps
            .iter()
            .map(|a| AppView {
                spark: spark(&a.name).unwrap_or_default(),
                ..self.view(a)
            })
            .collect();
        let mut ctx = self.context();
        ctx.insert("apps", &views);
        ctx.insert("counts", &counts);
        self.render("overview.html", &ctx)
    }

    /// The page of one app: its facts, recent output and Nginx file.
    pub fn app(
        &self,
        app: &AppReport,
        log: &[String],
        nginx_path: &str,
        nginx_conf: Option<&str>,
        traffic: Option<&Traffic>,
    ) -> Result<String, PageError> {
        let mut ctx = self.context();
        ctx.insert("app", &self.view(app));
        ctx.insert("traffic", &traffic);
        let log = if log.is_empty() {
            "(no output yet)".to_string()
        } else {
            log.join("\n")
        };
        ctx.insert("log", &log);
        ctx.insert("nginx_path", nginx_path);
        ctx.insert(
            "nginx_conf",
            nginx_conf.unwrap_or("(none: the app is not in Nginx right now)"),
        );
        ctx.insert("script", SCRIPT);
        ctx.insert("releases", &release_rows(app));
        ctx.insert("releases_bytes", &app.releases_bytes);
        self.render("app.html", &ctx)
    }

    /// The 404 page; `path` and `host` come straight from the request.
    pub fn not_found(&self, path: &str, host: &str, detail: &str) -> Result<String, PageError> {
        let mut ctx = self.context();
        ctx.insert("path", path);
        ctx.insert("host", host);
        ctx.insert("detail", detail);
        self.render("not_found.html", &ctx)
    }

    fn context(&self) -> tera::Context {
        let mut ctx = tera::Context::new();
        ctx.insert("css", CSS);
        ctx.insert("machine", &self.machine);
        ctx.insert("version", crate::build::VERSION);
        ctx.insert(
            "now",
            &shown_time(&crate::report::rfc3339(std::time::SystemTime::now())),
        );
        ctx
    }

    fn render(&self, name: &str, ctx: &tera::Context) -> Result<String, PageError> {
        self.tera
            .render(name, ctx)
            .map_err(|e| PageError(format!("rendering {name}: {e}")))
    }

    fn view(&self, a: &AppReport) -> AppView {
        let none = || "none".to_string();
        let join = |items: Vec<String>| {
            if items.is_empty() {
                none()
            } else {
                items.join(", ")
            }
        };
        let port_suffix = if self.http_port == 80 {
            String::new()
        } else {
            format!(":{}", self.http_port)
        };
        let deploy = a.last_deploy.as_ref();
        AppView {
            name: a.name.clone(),
            state: a.state.as_str(),
            sha256: a.sha256.clone().unwrap_or_default(),
            sha_short: a
                .sha256
                .as_deref()
                .map(|s| s.chars().take(12).collect())
                .unwrap_or_default(),
            bundle_time: a
                .bundle_time
                .as_deref()
                .map(shown_time)
                .unwrap_or_else(none),
            deploy: a.deploy.map(|d| d.to_string()).unwrap_or_else(none),
            since: a.since.as_deref().map(shown_time).unwrap_or_else(none),
            hosts: a
                .hosts
                .iter()
                .map(|h| HostLink {
                    name: h.clone(),
                    href: if h.starts_with('*') {
                        String::new()
                    } else {
                        format!("http://{h}{port_suffix}/")
                    },
                })
                .collect(),
            ports: join(
                a.processes
                    .iter()
                    .filter_map(|p| p.port.map(|p| p.to_string()))
                    .collect(),
            ),
            pids: join(
                a.processes
                    .iter()
                    .filter_map(|p| p.pid.map(|p| p.to_string()))
                    .collect(),
            ),
            uptime: a.uptime_seconds.map(duration).unwrap_or_else(none),
            restarts: a.restarts,
            deploy_result: deploy.map(|d| d.result.as_str()).unwrap_or(""),
            deploy_kind: deploy.and_then(|d| d.error_kind).unwrap_or(""),
            deploy_retry: deploy
                .and_then(|d| d.retry_at.as_deref())
                .map(shown_time)
                .unwrap_or_default(),
            deploy_duration: deploy
                .map(|d| format!("in {} ms", d.duration_ms))
                .unwrap_or_default(),
            deploy_finished: deploy.map(|d| shown_time(&d.finished)).unwrap_or_default(),
            last_error: a.last_error.clone().unwrap_or_default(),
            auto_rollback: a
                .auto_rollback
                .as_ref()
                .map(|r| r.describe())
                .unwrap_or_default(),
            log_lines_dropped: a.log_lines_dropped,
            draining: a.draining,
            processes: a
                .processes
                .iter()
                .map(|p| ProcessView {
                    kind: p.kind,
                    stanza: p.stanza,
                    port: p.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    pid: p
                        .pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "not running".into()),
                    restarts: p.restarts,
                    health: p.health,
                    health_latency_ms: p.health_latency_ms,
                    health_failures: p.health_failures,
                    health_error: p.health_error.clone(),
                    health_replacements: p.health_replacements,
                    cpu: shown_cpu(&p.usage),
                    memory: shown_memory(&p.usage),
                    tasks: shown_of(p.usage.tasks, p.usage.tasks_limit, |n| n.to_string()),
                    oom_kills: p
                        .usage
                        .oom_kills
                        .map(|n| n.to_string())
                        .unwrap_or_else(unknown),
                })
                .collect(),
            certificates: a.certificates.iter().map(cert_view).collect(),
            spark: String::new(),
        }
    }
}

/// CPU time and the limit: `12.3 s (limit 1.5 cores)`.
fn shown_cpu(u: &crate::cgroup::Usage) -> String {
    let time = u
        .cpu_usec
        .map(|us| format!("{:.1} s", us as f64 / 1e6))
        .unwrap_or_else(unknown);
    match u.cpu_limit_millis {
        Some(m) => format!("{time} (limit {} cores)", m as f64 / 1000.0),
        None => time,
    }
}

/// Memory now, its peak and the limit: `42 MiB (peak 50 MiB) of 512 MiB`.
fn shown_memory(u: &crate::cgroup::Usage) -> String {
    use crate::cgroup::human_bytes;
    let mut out = u.memory_bytes.map(human_bytes).unwrap_or_else(unknown);
    if let Some(p) = u.memory_peak_bytes {
        out.push_str(&format!(" (peak {})", human_bytes(p)));
    }
    if let Some(l) = u.memory_limit_bytes {
        out.push_str(&format!(" of {}", human_bytes(l)));
    }
    out
}

/// A figure and its limit: `3 of 256`.
fn shown_of(v: Option<u64>, limit: Option<u64>, show: impl Fn(u64) -> String) -> String {
    match (v, limit) {
        (Some(v), Some(l)) => format!("{} of {}", show(v), show(l)),
        (Some(v), None) => show(v),
        (None, _) => unknown(),
    }
}

/// What this host cannot tell (no control group to read it from).
fn unknown() -> String {
    "-".to_string()
}

fn cert_view(c: &crate::acme::CertStatus) -> CertView {
    let time = |t: Option<std::time::SystemTime>| {
        t.map(|t| shown_time(&rfc3339(t)))
            .unwrap_or_else(|| "-".into())
    };
    CertView {
        hosts: c.hosts.join(", "),
        state: match c.state {
            crate::acme::CertState::Obtaining => "obtaining",
            crate::acme::CertState::Valid => "valid",
            crate::acme::CertState::Renewing => "renewing",
            crate::acme::CertState::Expired => "expired",
        },
        valid_until: time(c.valid_until),
        renew_at: time(c.renew_at),
        next_attempt: time(Some(c.next_attempt)),
        failures: c.failures,
        error: c
            .last_error
            .as_ref()
            .map(|e| format!("{}: {}", e.kind.as_str(), e.message))
            .unwrap_or_default(),
    }
}

/// `2026-11-27T14:09:53.123Z` as `2026-11-27 14:09:53 UTC`.
fn shown_time(rfc3339: &str) -> String {
    match rfc3339.split_once('T') {
        Some((date, time)) => {
            let time = time.trim_end_matches('Z');
            let time = time.split('.').next().unwrap_or(time);
            format!("{date} {time} UTC")
        }
        None => rfc3339.to_string(),
    }
}

/// A duration for people: `45s`, `12m 05s`, `3h 07m`, `2d 04h`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A CSP source matching `text` by its SHA-256: `sha256-BASE64`.
fn sha256_source(text: &str) -> String {
    format!("sha256-{}", base64(&Sha256::digest(text.as_bytes())))
}

/// Standard base64 with padding (only CSP hashes need it; not worth a dependency).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::AppName;
    use crate::report::{DeployReport, DeployResult, ProcessReport};

    fn report() -> AppReport {
        let mut r = AppReport::new(&AppName::new("hello").unwrap());
        r.state = AppState::Running;
        r.sha256 = Some("ab".repeat(32));
        r.hosts = vec!["hello.example.com".into(), "*.example.org".into()];
        r.processes = vec![ProcessReport {
            kind: "webapp",
            stanza: 0,
            port: Some(4001),
            pid: Some(1234),
            restarts: 2,
            health: Some("failing"),
            health_latency_ms: Some(5000),
            health_failures: 2,
            health_error: Some("timed out after 5 s".into()),
            health_replacements: 1,
            usage: Default::default(),
            group: None,
        }];
        r.uptime_seconds = Some(3725);
        r.last_deploy = Some(DeployReport {
            result: DeployResult::Failed,
            finished: "2026-11-27T14:09:53.123Z".into(),
            duration_ms: 812,
            error: Some("<b>bad</b>".into()),
            error_kind: Some("config"),
            retry_at: None,
        });
        r.last_error = Some("<script>alert(1)</script>".into());
        r
    }

    #[test]
    fn pages_escape_everything_from_apps_and_requests() {
        let pages = Pages::new(8080).unwrap();
        let overview = pages.overview(&[report()], |_| None).unwrap();
        assert!(
            overview.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;")
                || overview.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{overview}"
        );
        assert!(!overview.contains("<script>alert"));
        assert!(overview.contains("href=\"http://hello.example.com:8080/\""));
        assert!(overview.contains("1h 02m"));
        let app = pages
            .app(
                &report(),
                &["<img src=x onerror=alert(1)>".to_string()],
                "/r/nginx/apps/hello.conf",
                None,
                None,
            )
            .unwrap();
        assert!(!app.contains("<img src=x"), "{app}");
        assert!(app.contains("&lt;img src=x"));
        // Each webapp's health, beside its costs.
        assert!(
            app.contains("failing (2 failed: timed out after 5 s)") && app.contains("5000 ms"),
            "{app}"
        );
        // keter's own script is there, once.
        assert_eq!(app.matches("<script>").count(), 1);
        let nf = pages
            .not_found("/<script>", "<script>alert(1)</script>", "")
            .unwrap();
        assert!(!nf.contains("<script>"), "{nf}");
    }

    #[test]
    fn csp_hashes_match_the_inline_style_and_script() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let pages = Pages::new(80).unwrap();
        assert!(pages.csp().contains(&sha256_source(SCRIPT)));
        assert!(pages.csp().contains(&sha256_source(CSS)));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 05s");
        assert_eq!(duration(3 * 3600 + 7 * 60), "3h 07m");
        assert_eq!(duration(2 * 86_400 + 4 * 3600), "2d 04h");
        assert_eq!(
            shown_time("2026-11-27T14:09:53.123Z"),
            "2026-11-27 14:09:53 UTC"
        );
    }
}

/// One line of the app page's releases (README "Releases and rollback").
#[derive(serde::Serialize)]
struct ReleaseRow {
    number: u64,
    sha_short: String,
    size: u64,
    deployed_at: String,
    by: String,
    ended: String,
    reason: String,
}

/// The releases of an app, newest first.
fn release_rows(app: &AppReport) -> Vec<ReleaseRow> {
    app.releases
        .iter()
        .rev()
        .map(|r| {
            let mut ended = match r.ended {
                None => "serving".to_string(),
                Some(e) => serde_json::to_value(e)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            };
            if let Some(to) = r.rollback_of {
                ended.push_str(&format!(" (rollback to release {to})"));
            }
            ReleaseRow {
                number: r.number,
                sha_short: r.sha256.chars().take(12).collect(),
                size: r.size,
                deployed_at: shown_time(&r.deployed_at),
                by: match &r.deployed_by_user {
                    Some(u) => format!("{u} ({})", r.deployed_by),
                    None => format!("uid {}", r.deployed_by),
                },
                ended,
                reason: r.reason.clone().unwrap_or_default(),
            }
        })
        .collect()
}
