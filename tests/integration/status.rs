//! The status interface: HTML pages (parsed with an HTML parser, and loaded in headless
//! Chromium), the JSON API, the Prometheus text and `keter status`, with apps in every state.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keter::status::StatusAddress;
use scraper::{Html, Selector};
use serde_json::Value;

use crate::support::*;

pub const WAIT: Duration = Duration::from_secs(30);
const XSS: &str = "<script>alert(1)</script>";

/// `GET path` from the daemon's status interface, with `host` as the Host header (TCP only).
fn status_get_as(k: &Keter, host: &str, path: &str) -> Response {
    let timeout = Duration::from_secs(10);
    let r = match k.status.as_ref().expect("the status interface is enabled") {
        StatusAddress::Tcp(a) => keter::probe::get_tcp(*a, host, path, timeout),
        StatusAddress::Unix(p) => keter::probe::get_unix(p, path, timeout),
    };
    r.unwrap_or_else(|e| panic!("GET {path} from the status interface: {e}:\n{}", k.log()))
}

fn status_get(k: &Keter, path: &str) -> Response {
    status_get_as(k, "keter-status", path)
}

pub fn json(k: &Keter, path: &str) -> Value {
    let r = status_get(k, path);
    assert_eq!(r.status, 200, "{path}: {r:?}");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
}

/// An HTML page of the status interface.
pub fn page(k: &Keter, path: &str) -> String {
    let r = status_get(k, path);
    assert_eq!(r.status, 200, "{path}: {r:?}");
    r.body
}

/// Waits until the API reports `app` in `state`; returns its report.
pub fn wait_state(k: &Keter, app: &str, state: &str) -> Value {
    let start = Instant::now();
    loop {
        let r = status_get(k, &format!("/api/apps/{app}"));
        if r.status == 200 {
            let v: Value = serde_json::from_str(&r.body).unwrap();
            if v["state"] == state {
                return v;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "{app} never became {state}: {r:?}\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn select<'a>(doc: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    doc.select(&Selector::parse(css).unwrap()).collect()
}

fn text(e: &scraper::ElementRef) -> String {
    e.text().collect()
}

/// Deploys the example app answering `version` on `host` (the version may hold any text).
fn deploy_hello_as(k: &Keter, name: &str, version: &str, host: &str) {
    let path = k.dir.0.join(format!("{name}.keter"));
    BundleBuilder::hello(&hello_yaml(version, host, &[])).write(&path);
    k.deploy(name, &path);
}

/// Deploys a bundle that cannot start: a missing executable and a host name with markup in
/// it, so that its error message carries `<script>`.
fn deploy_broken(k: &Keter, name: &str) {
    let path = k.dir.0.join(format!("{name}.keter"));
    let yaml = format!("exec: ../dist/missing\nhost: \"{XSS}.example.com\"\n");
    BundleBuilder::hello(&yaml).write(&path);
    k.deploy(name, &path);
}

/// Every sample of a Prometheus text, and the declared type of every family.
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    types: BTreeMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics {
            samples: Vec::new(),
            types: BTreeMap::new(),
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                m.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels end with }");
                    let mut labels = BTreeMap::new();
                    for pair in inner.split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .expect("quoted label value");
                        labels.insert(k.to_string(), v.to_string());
                    }
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            m.samples.push((name.to_string(), labels, value));
        }
        for (name, _, _) in &m.samples {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| m.types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(m.types.contains_key(family), "{name} has no # TYPE line");
        }
        m
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no sample {name}{want:?}"))
    }
}

/// Runs the `keter` binary; returns its exit code, stdout and stderr.
pub fn keter_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keter"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn status_interface_reports_apps_in_every_state() {
    let k = Keter::start_with(
        "status-states",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    k.wait_log("keter: status interface on", WAIT);
    k.deploy_hello("good", "v1", "good.example.com", &[]);
    deploy_hello_as(&k, "xss", XSS, "xss.example.com");
    k.deploy_hello(
        "loop",
        "v1",
        "loop.example.com",
        &["--crash-after-first-run"],
    );
    k.deploy_hello("gone", "v1", "gone.example.com", &[]);
    deploy_broken(&k, "broken");
    k.wait_for("good.example.com", "v1", WAIT);
    k.wait_for("xss.example.com", XSS, WAIT);
    k.wait_for("loop.example.com", "v1", WAIT);
    k.wait_for("gone.example.com", "v1", WAIT);
    let _ = k.get("loop.example.com", "/exit");
    fs::remove_file(k.incoming().join("gone.keter")).unwrap();
    wait_state(&k, "gone", "stopped");
    wait_state(&k, "broken", "failed");
    wait_state(&k, "loop", "crash-looping");

    // JSON: the documented fields, with the facts of each state.
    let all = json(&k, "/api/apps");
    assert_eq!(all["keter_version"], env!("CARGO_PKG_VERSION"));
    // The build as well (`src/build.rs`), so that an upgrade to another build shows.
    assert_eq!(all["keter_build"], keter::build::BUILD);
    let apps = all["apps"].as_array().unwrap();
    let names: Vec<&str> = apps.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "gone", "good", "loop", "xss"]);
    let good = json(&k, "/api/apps/good");
    for field in [
        "name",
        "state",
        "sha256",
        "bundle_time",
        "deploy",
        "hosts",
        "processes",
        "since",
        "uptime_seconds",
        "restarts",
        "last_deploy",
        "last_error",
        "log_lines_dropped",
        "draining",
    ] {
        assert!(good.get(field).is_some(), "no {field} in {good}");
    }
    assert_eq!(good["state"], "running");
    assert_eq!(good["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(good["hosts"], serde_json::json!(["good.example.com"]));
    let proc0 = &good["processes"][0];
    assert_eq!(proc0["kind"], "webapp");
    assert!(alive(proc0["pid"].as_i64().unwrap() as i32));
    assert!(proc0["port"].as_u64().is_some());
    // Its health while serving (README "Supervision"): checked every 10 s by default.
    let health = proc0["health"].as_str().unwrap();
    assert!(["unchecked", "healthy"].contains(&health), "{proc0}");
    assert_eq!(proc0["health_failures"], 0);
    assert_eq!(good["last_deploy"]["result"], "succeeded");
    assert!(good["last_deploy"]["duration_ms"].as_u64().is_some());
    assert!(good["last_error"].is_null());
    let broken = json(&k, "/api/apps/broken");
    assert_eq!(broken["last_deploy"]["result"], "failed");
    assert!(broken["sha256"].is_null());
    let broken_error = broken["last_error"].as_str().unwrap();
    assert!(broken_error.contains(XSS), "{broken_error}");
    let looping = json(&k, "/api/apps/loop");
    assert!(looping["restarts"].as_u64().unwrap() >= 1, "{looping}");
    assert!(looping["last_error"].as_str().unwrap().contains("exited"));
    assert_eq!(
        json(&k, "/api/apps/gone")["processes"],
        serde_json::json!([])
    );
    assert_eq!(status_get(&k, "/api/apps/nobody").status, 404);
    let log = json(&k, "/api/apps/xss/log?lines=50");
    assert!(
        log["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains(XSS)),
        "{log}"
    );

    // HTML overview: one row per app with its state; hosts are links; nothing runs.
    let page = status_get(&k, "/");
    assert_eq!(page.status, 200);
    let doc = Html::parse_document(&page.body);
    let rows = select(&doc, "tr.app");
    assert_eq!(rows.len(), 5, "{}", page.body);
    for (row, app) in rows.iter().zip(apps) {
        assert_eq!(row.value().attr("data-app"), app["name"].as_str());
        let state = Selector::parse(".state").unwrap();
        let shown = text(&row.select(&state).next().unwrap());
        assert_eq!(shown, app["state"].as_str().unwrap());
    }
    assert_eq!(
        select(&doc, "a[href=\"http://good.example.com/\"]").len(),
        1
    );
    assert!(select(&doc, "script").is_empty());
    assert!(
        text(&select(&doc, ".sub")[0]).contains(&format!("keter {}", keter::build::VERSION)),
        "{}",
        page.body
    );
    let broken_row = select(&doc, "tr[data-app=broken] .error");
    assert!(text(&broken_row[0]).contains(XSS));

    // App pages: log lines and errors are text; the only script is keter's own.
    let doc = Html::parse_document(&status_get(&k, "/apps/xss").body);
    assert!(text(&select(&doc, "pre#log")[0]).contains(XSS));
    assert!(text(&select(&doc, "pre#nginx-conf")[0]).contains("upstream keter_xss"));
    assert_eq!(text(&select(&doc, "#state")[0]), "running");
    let scripts = select(&doc, "script");
    assert_eq!(scripts.len(), 1);
    assert!(!text(&scripts[0]).contains("alert"));
    let doc = Html::parse_document(&status_get(&k, "/apps/broken").body);
    assert!(text(&select(&doc, "#last-error")[0]).contains(XSS));
    assert_eq!(select(&doc, "script").len(), 1);
    assert_eq!(status_get(&k, "/apps/nobody").status, 404);

    // A Host header with markup is shown as text (Keter #246).
    let r = status_get_as(&k, XSS, "/no-such-page");
    assert_eq!(r.status, 404);
    let doc = Html::parse_document(&r.body);
    assert!(select(&doc, "script").is_empty(), "{}", r.body);
    assert!(text(&select(&doc, "#not-found")[0]).contains(XSS));

    // Read-only: other methods are refused before routing.
    let Some(StatusAddress::Tcp(addr)) = k.status.clone() else {
        unreachable!()
    };
    for request in ["POST / HTTP/1.1", "DELETE /api/apps/good HTTP/1.1"] {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{request}\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 405"), "{request}: {answer}");
    }
    assert_eq!(json(&k, "/api/apps/good")["state"], "running");

    // Metrics: parsed, and matching what happened.
    let r = status_get(&k, "/metrics");
    assert_eq!(r.status, 200);
    let m = Metrics::parse(&r.body);
    let deploys = |result| m.get("keter_deploys_total", &[("result", result)]);
    assert_eq!(deploys("succeeded"), 4.0, "{}", r.body);
    // A failed bundle may be tried once per file event of its rename; each try is counted.
    let failures = k.log_count("deploy of broken.keter failed");
    assert!(failures >= 1);
    assert_eq!(deploys("failed"), failures as f64);
    assert_eq!(deploys("superseded"), 0.0);
    assert_eq!(m.types["keter_deploys_total"], "counter");
    assert_eq!(m.types["keter_deploy_duration_seconds"], "histogram");
    assert_eq!(m.get("keter_deploy_duration_seconds_count", &[]), 4.0);
    assert_eq!(
        m.get("keter_deploy_duration_seconds_bucket", &[("le", "+Inf")]),
        4.0
    );
    let buckets: Vec<f64> = m
        .samples
        .iter()
        .filter(|(n, _, _)| n == "keter_deploy_duration_seconds_bucket")
        .map(|(_, _, v)| *v)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(m.get("keter_readiness_wait_seconds_count", &[]), 4.0);
    let apps_in = |state| m.get("keter_apps", &[("state", state)]);
    assert_eq!(apps_in("running"), 2.0);
    assert_eq!(apps_in("failed"), 1.0);
    assert_eq!(apps_in("crash-looping"), 1.0);
    assert_eq!(apps_in("stopped"), 1.0);
    assert_eq!(apps_in("starting") + apps_in("deploying"), 0.0);
    assert!(m.get("keter_app_restarts_total", &[("app", "loop")]) >= 1.0);
    assert_eq!(
        m.get("keter_app_log_lines_dropped_total", &[("app", "good")]),
        0.0
    );
    // Changes that arrive together may share one reload.
    assert!(m.get("keter_nginx_reloads_total", &[]) >= 1.0);
    assert_eq!(m.get("keter_nginx_reload_failures_total", &[]), 0.0);
    assert_eq!(m.get("keter_nginx_test_failures_total", &[]), 0.0);

    // `keter status`, as a table and as JSON, over TCP.
    let config = k.config_path.to_str().unwrap();
    let (code, out, err) = keter_cmd(&["status", "-c", config]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("APP") && lines[0].contains("STATE"),
        "{out}"
    );
    for (line, app) in lines[1..6].iter().zip(apps) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], app["name"].as_str().unwrap(), "{out}");
        assert_eq!(cells[1], app["state"].as_str().unwrap(), "{out}");
    }
    assert!(out.contains("broken: last error: "), "{out}");
    let (code, out, err) = keter_cmd(&["status", "-c", config, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["apps"].as_array().unwrap().len(), 5);
}

/// The headless browser Debian packages; `scripts/test` installs it.
fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("chromium is not installed: run `apt-get install -y chromium` (scripts/test does)");
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
pub fn browse(profile: &Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "chromium {args:?} {url} exited with {status}"
            );
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// Saves a screenshot of `url` at window `size` ("WIDTH,HEIGHT") as `shots/name`, with a Chromium
/// profile of its own under `profiles`, and checks that it is a PNG with something drawn.
pub fn screenshot(profiles: &Path, shots: &Path, name: &str, url: &str, size: &str) {
    let file = shots.join(name);
    let _ = fs::remove_file(&file);
    browse(
        &profiles.join(format!("chromium-{name}")),
        url,
        &[
            &format!("--screenshot={}", file.display()),
            &format!("--window-size={size}"),
            "--virtual-time-budget=3000",
        ],
    );
    assert_png(&file);
    eprintln!("screenshot: {}", file.display());
}

pub fn assert_png(path: &Path) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert!(bytes.len() > 5_000, "{} is nearly empty", path.display());
}

#[test]
fn a_browser_shows_every_app_and_the_live_log() {
    let k = Keter::start_with(
        "status-browser",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    k.deploy_hello("good", "v1", "good.example.com", &[]);
    deploy_hello_as(&k, "xss", XSS, "xss.example.com");
    deploy_broken(&k, "broken");
    k.wait_for("good.example.com", "v1", WAIT);
    wait_state(&k, "xss", "running");
    wait_state(&k, "broken", "failed");
    let Some(StatusAddress::Tcp(addr)) = k.status.clone() else {
        unreachable!()
    };
    let base = format!("http://{addr}");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-screenshots");
    fs::create_dir_all(&shots).unwrap();
    let profile = |n: &str| k.dir.0.join(format!("chromium-{n}"));

    // The overview, after the browser ran it: every app is there, and nothing injected ran.
    let dom = browse(
        &profile("dom"),
        &format!("{base}/"),
        &["--dump-dom", "--virtual-time-budget=3000"],
    );
    let doc = Html::parse_document(&dom);
    let shown: Vec<&str> = select(&doc, "tr.app")
        .iter()
        .filter_map(|r| r.value().attr("data-app"))
        .collect();
    assert_eq!(shown, ["broken", "good", "xss"], "{dom}");
    assert!(select(&doc, "script").is_empty());

    // The app page: its script polled the log endpoint and put the lines in as text.
    let dom = browse(
        &profile("app"),
        &format!("{base}/apps/xss"),
        &["--dump-dom", "--virtual-time-budget=5000"],
    );
    let doc = Html::parse_document(&dom);
    let log = &select(&doc, "pre#log")[0];
    let polls: u32 = log.value().attr("data-polls").unwrap().parse().unwrap();
    assert!(
        polls >= 1,
        "the page's script did not refresh the log:\n{dom}"
    );
    assert!(text(log).contains(XSS));
    assert_eq!(select(&doc, "script").len(), 1);
    assert!(text(&select(&doc, "#log-updated")[0]).starts_with("live"));

    for (name, url, size) in [
        ("overview.png", format!("{base}/"), "1400,900"),
        ("overview-phone.png", format!("{base}/"), "390,844"),
        ("app-xss.png", format!("{base}/apps/xss"), "1280,1000"),
    ] {
        screenshot(&k.dir.0, &shots, name, &url, size);
    }
}

#[test]
fn a_status_address_in_use_does_not_stop_deploys() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let k = Keter::start_with(
        "status-in-use",
        Opts {
            status: StatusAt::At(addr),
            ..Opts::default()
        },
    );
    k.wait_log("cannot serve the status interface", WAIT);
    k.deploy_hello("hello", "v1", "hello.example.com", &[]);
    k.wait_for("hello.example.com", "v1", WAIT);
    drop(taken);
}

#[test]
fn a_deleted_app_whose_last_deploy_failed_is_stopped() {
    let k = Keter::start("status-failed-deleted");
    deploy_broken(&k, "broken");
    let report = wait_state(&k, "broken", "failed");
    assert_eq!(report["last_deploy"]["result"], "failed");
    assert_eq!(report["last_deploy"]["error_kind"], "config", "{report}");
    assert_eq!(report["last_deploy"]["retry_at"], Value::Null, "{report}");
    // `keter status` shows the kind next to the result.
    let config = k.config_path.display().to_string();
    let (code, out, err) = keter_cmd(&["status", "-c", &config]);
    assert_eq!(code, 0, "{out}{err}");
    let row = out.lines().find(|l| l.starts_with("broken")).unwrap();
    assert!(row.contains("failed (config)"), "{out}");

    fs::remove_file(k.incoming().join("broken.keter")).unwrap();
    let report = wait_state(&k, "broken", "stopped");
    assert_eq!(report["processes"], serde_json::json!([]));
}

/// A deploy that fails on a file that is gone waits for a new bundle instead of being tried
/// again and again: here `temp/`, where bundles unpack, was removed under keter (ENOENT).
#[test]
fn an_unpack_into_a_folder_that_is_gone_is_not_retried() {
    let k = Keter::start("status-unpack-gone");
    fs::remove_dir_all(k.root.join("temp")).unwrap();
    k.deploy_hello("gone", "v1", "gone.example.com", &[]);
    let report = wait_state(&k, "gone", "failed");
    assert_eq!(report["last_deploy"]["error_kind"], "unpack", "{report}");
    let error = report["last_deploy"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot create"), "{report}");
    assert_eq!(report["last_deploy"]["retry_at"], Value::Null, "{report}");
}

/// The TCP status interface refuses Nginx's workers: what Nginx passes on comes from anyone
/// who reaches Nginx, and a bundle's reverse-proxy host may resolve to this host only when
/// Nginx reloads later (the bundle check cannot see that). A process running as the workers'
/// user (www-data) gets a 403 that says why; operators are still answered.
#[test]
fn the_tcp_status_interface_refuses_nginxs_workers() {
    let k = Keter::start_with(
        "status-workers",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let Some(StatusAddress::Tcp(addr)) = k.status else {
        unreachable!("a TCP status address was asked for")
    };
    let workers = nix::unistd::User::from_name("www-data")
        .unwrap()
        .expect("the user www-data (Debian's Nginx package creates it)");
    let uid = workers.uid.as_raw();
    // The managed Nginx's workers do run as that user.
    let nginx_workers = Command::new("ps")
        .args(["-o", "uid=", "--ppid", &k.nginx_pid().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nginx_workers.stdout)
            .split_whitespace()
            .all(|u| u == uid.to_string()),
        "{nginx_workers:?}"
    );
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10"])
            .arg(format!("http://{addr}/api/apps"))
            .uid(uid)
            .gid(workers.gid.as_raw())
            .output()
            .expect("curl (apt-get install curl)")
    };
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("HTTP/1.1 403"),
        "uid {uid} (Nginx's workers) was answered:\n{answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        answer.contains("does not answer Nginx's workers"),
        "{answer}"
    );
    assert!(!answer.contains("keter_version"), "{answer}");
    k.wait_log(&format!("the status interface refused uid {uid}"), WAIT);
    // An operator still reads it.
    assert_eq!(json(&k, "/api/apps")["apps"], serde_json::json!([]));
}

/// An app opens 1,100 connections to the TCP status interface and sends nothing: keter, started
/// with systemd's limit of 1024 open files, keeps its descriptors (apps are refused as soon as
/// their connection is accepted), `keter status` answers, and a bundle copied in meanwhile
/// deploys without a SIGHUP.
#[test]
fn an_apps_idle_connections_do_not_exhaust_keters_descriptors() {
    let k = Keter::start_with(
        "status-idle",
        Opts {
            status: StatusAt::Tcp,
            readiness_timeout: 20.0,
            open_files: Some((1024, 4096)),
            ..Opts::default()
        },
    );
    let Some(StatusAddress::Tcp(addr)) = k.status else {
        unreachable!("a TCP status address was asked for")
    };
    crate::isolation::deploy_probe(&k, "tenant", "tenant.example.com");
    let r = keter::probe::get_tcp(
        k.addr(),
        "tenant.example.com",
        &format!("/hold?addr={addr}&n=1100"),
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("held 1100 connections"), "{r:?}");

    // `keter status` (with its own 10 s timeout) as the operator runs it.
    let out = Command::new(&k.bin)
        .args(["status", "-c"])
        .arg(&k.config_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keter status failed while an app held 1100 connections: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        k.log()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tenant"));
    k.deploy_hello("late", "l1", "late.example.com", &[]);
    k.wait_for("late.example.com", "l1", WAIT);
    assert!(
        k.log().contains("the status interface refused uid"),
        "{}",
        k.log()
    );
    // keter raised its own soft limit to the hard one; apps get the one it was started with.
    assert_eq!(open_files(k.pid()), ("4096".into(), "4096".into()));
    let app = k.pid_of("late.example.com");
    assert_eq!(open_files(app), ("1024".into(), "4096".into()));
}
