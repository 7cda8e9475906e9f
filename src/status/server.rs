//! The status web server: axum on a small tokio runtime of its own thread (tokio runs the
//! control plane's own I/O and never blocking work; README, "Status interface"). It holds
//! only what it reads, the workers' [`crate::report::Reports`] and the Nginx counters; no
//! request changes anything, and every method but GET and HEAD is refused. Who may connect,
//! how many connections there may be and how long they may idle is `conn.rs`'s business;
//! this file decides whom to refuse: apps, and on TCP Nginx's workers.
//!
//! A status address that cannot be bound is logged as an error and retried every ten seconds
//! while keter goes on deploying apps: the status interface is not worth stopping the
//! deploys for (and a keter that refused to start would take every app down with it).

use std::io;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::StatusAddress;
use super::conn::{self, Limits, Listening, Refuse, Via};
use super::metrics;
use super::pages::{LOG_LINES, PageError, Pages, Traffic};
use super::peer::Peer;
use crate::config::Config;
use crate::isolation::Isolation;
use crate::names::AppName;
use crate::nginx::{NginxCounters, NginxHandle, Paths};
use crate::report::{AppReport, AppState, Reports};

/// How often a status address that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(10);
/// How long open connections may take to finish once keter shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The running status server; [`StatusServer::stop`] ends it.
pub struct StatusServer {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// What every request handler sees.
#[derive(Clone)]
struct ServerState {
    reports: Arc<Reports>,
    nginx: Arc<NginxCounters>,
    pages: Arc<Pages>,
    paths: Arc<Paths>,
}

impl StatusServer {
    /// Starts serving `reports` and the Nginx counters on the configured `status` address, to
    /// every peer that `isolation` does not call an app (nor, on TCP, Nginx's workers, whom
    /// `handle` finds). Returns `None` (after logging why) when the interface is disabled or
    /// cannot run at all.
    pub fn start(
        config: &Config,
        reports: Arc<Reports>,
        nginx: Arc<NginxCounters>,
        handle: NginxHandle,
        isolation: Arc<Isolation>,
    ) -> Option<StatusServer> {
        let Some(address) = config.status.clone() else {
            log::info!("keter: the status interface is disabled (status: false)");
            return None;
        };
        let pages = match Pages::new(config.external_http_port) {
            Ok(p) => p,
            Err(e) => {
                log::error!("keter: the status interface cannot run: {e}");
                return None;
            }
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                log::error!("keter: the status interface cannot run: no tokio runtime: {e}");
                return None;
            }
        };
        let state = ServerState {
            paths: Arc::new(Paths::new(&config.root)),
            reports,
            nginx,
            pages: Arc::new(pages),
        };
        let router = router(state);
        let refuse = refusal(isolation, handle);
        let (stop, stopped) = watch::channel(false);
        // The first bind happens before `start` returns, so that the interface answers once
        // the daemon says it is ready (its "watching" line, systemd's READY=1); later
        // attempts, while the address is taken, run on the server's thread.
        let first = runtime.block_on(bind(&address));
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                runtime.block_on(serve(address, first, router, refuse, stopped));
                // Connections still open after the grace period are dropped with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(500));
            });
        match thread {
            Ok(t) => Some(StatusServer {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                log::error!("keter: the status interface cannot run: no thread: {e}");
                None
            }
        }
    }

    /// Stops serving and waits until the server's thread is gone.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(state: ServerState) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/apps/{name}", get(app_page))
        .route("/api/apps", get(api_apps))
        .route("/api/apps/{name}", get(api_app))
        .route("/api/apps/{name}/log", get(api_log))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn bind(address: &StatusAddress) -> io::Result<Listening> {
    match address {
        StatusAddress::Tcp(addr) => tokio::net::TcpListener::bind(addr)
            .await
            .map(Listening::Tcp),
        StatusAddress::Unix(path) => bind_unix(path).await.map(Listening::Unix),
    }
}

/// Serves on `first` (the result of the first bind) or, while the address is taken, binds
/// again every `BIND_RETRY`, until `stopped` turns true.
async fn serve(
    address: StatusAddress,
    first: io::Result<Listening>,
    router: Router,
    refuse: Arc<Refuse>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut reported = false;
    let mut next = Some(first);
    loop {
        let bound = match next.take() {
            Some(b) => b,
            None => bind(&address).await,
        };
        match bound {
            Ok(listening) => {
                log::info!("keter: status interface on {address}");
                let ended = conn::serve(
                    listening,
                    router,
                    refuse,
                    Limits::DEFAULT,
                    stopped,
                    SHUTDOWN_GRACE,
                )
                .await;
                if !ended {
                    log::warn!("keter: status connections still open at shutdown were closed");
                }
                if let StatusAddress::Unix(path) = &address {
                    let _ = tokio::fs::remove_file(path).await;
                }
                return;
            }
            Err(e) if !reported => {
                log::error!(
                    "keter: cannot serve the status interface on {address}: {e}; apps are \
                     deployed anyway, and keter tries again every {} s",
                    BIND_RETRY.as_secs()
                );
                reported = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(BIND_RETRY) => {}
        }
    }
}

/// Binds a unix socket, replacing a stale socket file left by a keter that was killed, but
/// never one that a live process still answers on, nor a file that is not a socket.
async fn bind_unix(path: &FsPath) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = tokio::fs::symlink_metadata(path).await {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        match tokio::net::UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process answers on this socket",
                ));
            }
            Err(_) => tokio::fs::remove_file(path).await?,
        }
    }
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Owner and group only: the group of the socket's folder (the package's /run/keter is
    // setgid adm) decides which operators may connect.
    use std::os::unix::fs::PermissionsExt;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).await?;
    Ok(listener)
}

/// Who is refused, from the peer alone (README "Status interface"): apps' users, peers whose
/// origin cannot be told, and on TCP Nginx's workers: a request that Nginx passes on comes
/// from whoever reaches Nginx (a `reverse-proxy` stanza is refused at the bundle check, but a
/// name may resolve to this host only when Nginx reloads). On the unix socket, its mode and
/// folder decide: an operator who lets Nginx's workers reach it means it. The first refusal
/// of each uid is logged.
fn refusal(isolation: Arc<Isolation>, nginx: NginxHandle) -> Arc<Refuse> {
    Arc::new(move |peer: &Peer, via: Via| match peer {
        Peer::Uid(uid) => {
            let uid = *uid;
            if let Some(what) = isolation.app_of_uid(uid) {
                if isolation.first_refusal(uid) {
                    log::warn!("keter: the status interface refused uid {uid} ({what})");
                }
                return Some(format!(
                    "keter's status interface answers operators, not apps: uid {uid} is {what}"
                ));
            }
            if via != Via::Tcp {
                return None;
            }
            let workers = isolation.nginx_workers_user(uid, nginx.master_pid())?;
            if isolation.first_refusal(uid) {
                log::warn!(
                    "keter: the status interface refused uid {uid} ({workers}, the user of \
                     Nginx's workers): what Nginx passes on comes from anyone who reaches Nginx"
                );
            }
            Some(format!(
                "keter's status interface does not answer Nginx's workers (uid {uid}, \
                 {workers}): what Nginx passes on comes from anyone who reaches Nginx; read it \
                 directly, or over its unix socket (README, \"Status interface\")"
            ))
        }
        Peer::Remote(_) => None,
        Peer::Unknown(why) => Some(format!(
            "keter's status interface answers operators, not apps: keter cannot tell who \
             connected: {why}"
        )),
    })
}

/// Refuses every method but GET and HEAD, and adds the security headers to every response.
/// (Refused peers never get here: `conn.rs` answers them when it accepts their connection.)
async fn guard(State(s): State<ServerState>, request: Request, next: Next) -> Response {
    let mut response = if request.method() == Method::GET || request.method() == Method::HEAD {
        next.run(request).await
    } else {
        let mut r = (
            StatusCode::METHOD_NOT_ALLOWED,
            "keter's status interface is read-only: only GET and HEAD are accepted\n",
        )
            .into_response();
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    };
    let headers = response.headers_mut();
    if let Ok(csp) = HeaderValue::from_str(s.pages.csp()) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn overview(State(s): State<ServerState>) -> Response {
    let now = crate::requests::unix_now();
    html(s.pages.overview(&s.reports.apps(), |app| {
        let hour = s.reports.requests.series(app, crate::requests::HOUR, now)?;
        Some(crate::requests::plot::sparkline(&hour))
    }))
}

async fn app_page(
    State(s): State<ServerState>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Some((app, report)) = lookup(&s, &name) else {
        return not_found_page(&s, &uri, &headers, "No app has this name.");
    };
    let log = s
        .reports
        .log_tail(&report.name, LOG_LINES)
        .unwrap_or_default();
    let conf_path = s.paths.app_conf(&app);
    let conf = read_conf(&conf_path).await;
    html(s.pages.app(
        &report,
        &log,
        &conf_path.display().to_string(),
        conf.as_deref(),
        Traffic::of(&s.reports, &report.name, crate::requests::unix_now()).as_ref(),
    ))
}

/// The app's Nginx file, if it has one right now (read off the runtime's thread).
async fn read_conf(path: &FsPath) -> Option<String> {
    tokio::fs::read_to_string(path).await.ok()
}

/// `GET /api/apps`.
#[derive(Serialize)]
struct AppsBody {
    keter_version: &'static str,
    /// The build (`src/build.rs`): an upgrade to another build of one version shows here.
    keter_build: &'static str,
    apps: Vec<AppReport>,
}

async fn api_apps(State(s): State<ServerState>) -> Json<AppsBody> {
    Json(AppsBody {
        keter_version: crate::build::PACKAGE,
        keter_build: crate::build::BUILD,
        apps: s.reports.apps(),
    })
}

async fn api_app(State(s): State<ServerState>, Path(name): Path<String>) -> Response {
    match lookup(&s, &name) {
        Some((_, report)) => Json(report).into_response(),
        None => json_not_found("no app has this name"),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    lines: Option<usize>,
}

/// `GET /api/apps/NAME/log`.
#[derive(Serialize)]
struct LogBody {
    app: String,
    state: AppState,
    lines: Vec<String>,
    log_lines_dropped: u64,
}

async fn api_log(
    State(s): State<ServerState>,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some((_, report)) = lookup(&s, &name) else {
        return json_not_found("no app has this name");
    };
    let n = q.lines.unwrap_or(LOG_LINES).min(LOG_LINES);
    let lines = s.reports.log_tail(&report.name, n).unwrap_or_default();
    Json(LogBody {
        app: report.name,
        state: report.state,
        lines,
        log_lines_dropped: report.log_lines_dropped,
    })
    .into_response()
}

async fn metrics_text(State(s): State<ServerState>) -> Response {
    let body = metrics::render(&s.reports, &s.nginx);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn not_found(State(s): State<ServerState>, uri: Uri, headers: HeaderMap) -> Response {
    if uri.path().starts_with("/api/") {
        return json_not_found("no such endpoint");
    }
    not_found_page(&s, &uri, &headers, "")
}

/// An app known by this name; names that are not valid app names are never looked up.
fn lookup(s: &ServerState, name: &str) -> Option<(AppName, AppReport)> {
    let app = AppName::new(name).ok()?;
    let report = s.reports.app(app.as_str())?;
    Some((app, report))
}

fn not_found_page(s: &ServerState, uri: &Uri, headers: &HeaderMap, detail: &str) -> Response {
    let host = headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .unwrap_or_default();
    let mut r = html(s.pages.not_found(uri.path(), &host, detail));
    if r.status() == StatusCode::OK {
        *r.status_mut() = StatusCode::NOT_FOUND;
    }
    r
}

fn json_not_found(message: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

fn html(page: Result<String, PageError>) -> Response {
    match page {
        Ok(body) => Html(body).into_response(),
        Err(e) => {
            log::error!("keter: status page: {e}");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
        }
    }
}
