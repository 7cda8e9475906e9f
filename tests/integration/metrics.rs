//! Request metrics (README, "Request metrics") through the real thing: keter's managed Nginx
//! logs a line per request into keter's request log, keter counts it; the counts, classes, releases and latency
//! quantiles are read back from `/api/apps/NAME` and `/metrics`, the plots in headless Chromium.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keter::status::StatusAddress;
use scraper::{Html, Selector};
use serde_json::Value;

use crate::status::{Metrics, WAIT, browse, json, page, screenshot, wait_state};
use crate::support::*;

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "upstream_failure"];

/// The app's `requests` counters by class (all zero before its first request), once they
/// stopped changing: Nginx writes its lines at most a second after its answers
/// (`flush=1s`), and keter reads the log four times a second.
fn settled(k: &Keter, app: &str) -> Value {
    let read = || json(k, &format!("/api/apps/{app}"))["requests"].clone();
    let mut last = read();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = read();
        if now == last {
            return now;
        }
        assert!(start.elapsed() < WAIT, "{app}'s counts never settle");
        last = now;
    }
}

/// Requests by class, of the app or of one release (`{"release": n, ...}` in `releases`).
fn classes(v: &Value) -> BTreeMap<&'static str, u64> {
    CLASSES
        .iter()
        .map(|c| (*c, v["by_class"][c].as_u64().unwrap_or(0)))
        .collect()
}

fn release(requests: &Value, n: u64) -> Option<&Value> {
    requests["releases"]
        .as_array()?
        .iter()
        .find(|r| r["release"] == n)
}

/// Waits until the app's counts by class grew by `expected` over `before`.
fn wait_counts(k: &Keter, app: &str, before: &Value, expected: &BTreeMap<&str, u64>) -> Value {
    let start = Instant::now();
    loop {
        let now = json(k, &format!("/api/apps/{app}"))["requests"].clone();
        let (b, n) = (classes(before), classes(&now));
        let grown: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, n[c] - b[c])).collect();
        if &grown == expected {
            // Nothing more comes.
            std::thread::sleep(Duration::from_millis(500));
            let again = settled(k, app);
            assert_eq!(classes(&again), n, "more requests counted than were made");
            return again;
        }
        assert!(
            start.elapsed() < WAIT,
            "{app}: counted {grown:?}, made {expected:?}\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn class_of(status: u16) -> &'static str {
    match status {
        // The example app never answers 502 itself: these are Nginx's.
        502 => "upstream_failure",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn scaffold_bundle(k: &Keter, version: &str) -> PathBuf {
    let yaml = fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yesod-scaffold.yml"),
    )
    .unwrap()
    .replace(
        "[--version-string, scaffold]",
        &format!("[--version-string, {version}]"),
    );
    let path = k.dir.0.join(format!("scaffold-{version}.keter"));
    BundleBuilder::new()
        .file(
            "dist/bin/scaffold",
            fs::read(hello_binary()).unwrap(),
            0o755,
        )
        .file("config/keter.yml", yaml.into_bytes(), 0o644)
        .file(
            "static/css/site.css",
            b"body { color: teal }\n".to_vec(),
            0o644,
        )
        .write(&path);
    path
}

#[test]
fn counts_and_classes_are_exact_per_release_for_every_stanza() {
    let k = Keter::start_with(
        "metrics-counts",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    k.deploy("scaffold", &scaffold_bundle(&k, "v1"));
    k.wait_for("www.scaffold.example.com", "v1", WAIT);
    let first = wait_state(&k, "scaffold", "running")["deploy"]
        .as_u64()
        .unwrap();
    let before = settled(&k, "scaffold");

    // A known mix on the webapp, the static files and the redirect stanza; what the client
    // saw is what must be counted.
    let mut made: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    let mut bytes_seen = 0;
    let app = "www.scaffold.example.com";
    let mut get = |host: &str, path: &str| {
        let r = k.get(host, path).unwrap();
        *made.get_mut(class_of(r.status)).unwrap() += 1;
        bytes_seen += r.body.len();
        r.status
    };
    for _ in 0..20 {
        assert_eq!(get(app, "/"), 200);
    }
    for _ in 0..5 {
        assert_eq!(get(app, "/status?code=404"), 404);
    }
    for _ in 0..3 {
        assert_eq!(get(app, "/status?code=500"), 500);
    }
    for _ in 0..4 {
        assert_eq!(get("static.scaffold.example.com", "/css/site.css"), 200);
    }
    for _ in 0..2 {
        assert_eq!(get("static.scaffold.example.com", "/missing.css"), 404);
    }
    for _ in 0..3 {
        assert_eq!(get("scaffold.example.com", "/blog"), 303);
    }
    // The app exits mid-request: Nginx answers 502 itself, and goes on doing so until the
    // app is restarted.
    let status = get(app, "/exit");
    assert_eq!(status, 502, "the app's exit");
    let restarted = Instant::now();
    while get(app, "/") != 200 {
        assert!(restarted.elapsed() < WAIT, "the app never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(made["upstream_failure"] >= 1);
    assert!(bytes_seen > 0);
    let after = wait_counts(&k, "scaffold", &before, &made);
    // Everything went to the serving release.
    let (b, a) = (
        release(&before, first).map(classes).unwrap_or_default(),
        classes(release(&after, first).unwrap()),
    );
    for c in CLASSES {
        assert_eq!(
            a[c] - b.get(c).copied().unwrap_or(0),
            made[c],
            "release {first}, {c}"
        );
    }
    assert!(
        after["response_bytes"].as_u64().unwrap() > before["response_bytes"].as_u64().unwrap_or(0)
    );

    // A redeploy: the new release counts from zero; the old one stops growing.
    k.deploy("scaffold", &scaffold_bundle(&k, "v2"));
    k.wait_for(app, "v2", WAIT);
    let second = wait_state(&k, "scaffold", "running")["deploy"]
        .as_u64()
        .unwrap();
    assert!(second > first);
    std::thread::sleep(Duration::from_millis(500));
    let before = settled(&k, "scaffold");
    let mut made: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    for path in ["/", "/", "/status?code=503", "/status?code=418", "/"] {
        let r = k.get(app, path).unwrap();
        *made.get_mut(class_of(r.status)).unwrap() += 1;
    }
    let after = wait_counts(&k, "scaffold", &before, &made);
    let grown = |n: u64| {
        let b = release(&before, n).map(classes).unwrap_or_default();
        let a = classes(release(&after, n).unwrap());
        CLASSES
            .iter()
            .map(|c| (*c, a[c] - b.get(c).copied().unwrap_or(0)))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(grown(second), made);
    assert!(grown(first).values().all(|n| *n == 0), "{:?}", grown(first));
    assert_eq!(made["2xx"], 3);

    // /metrics has the same numbers per release, with Prometheus' conventions.
    let m = Metrics::parse(&page(&k, "/metrics"));
    for (n, r) in [
        (first, release(&after, first)),
        (second, release(&after, second)),
    ] {
        let r = r.unwrap();
        let n = n.to_string();
        for c in CLASSES {
            assert_eq!(
                m.get(
                    "keter_app_requests_total",
                    &[("app", "scaffold"), ("release", &n), ("class", c)]
                ),
                r["by_class"][c].as_u64().unwrap_or(0) as f64,
                "release {n} {c}"
            );
        }
        let count = m.get(
            "keter_app_upstream_response_seconds_count",
            &[("app", "scaffold"), ("release", &n)],
        );
        let inf = m.get(
            "keter_app_upstream_response_seconds_bucket",
            &[("app", "scaffold"), ("release", &n), ("le", "+Inf")],
        );
        assert_eq!(count, inf);
        assert!(count > 0.0);
        assert!(
            m.get(
                "keter_app_response_bytes_total",
                &[("app", "scaffold"), ("release", &n)]
            ) > 0.0
        );
    }
    assert_eq!(
        m.get(
            "keter_request_log_lines_dropped_total",
            &[("reason", "malformed")]
        ),
        0.0
    );
    assert_eq!(m.get("keter_request_log_skipped_bytes_total", &[]), 0.0);
    assert!(m.get("keter_request_log_lines_total", &[]) > 0.0);

    // keter status: one line of it per app.
    let (code, out, err) =
        crate::status::keter_cmd(&["status", "-c", k.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("scaffold: ") && l.contains("req/s") && l.contains("2xx")),
        "{out}"
    );
}

#[test]
fn latency_quantiles_are_within_a_bucket_of_the_truth() {
    let k = Keter::start_with(
        "metrics-latency",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let host = "slow.example.com";
    k.deploy_hello("slow", "v1", host, &[]);
    k.wait_for(host, "v1", WAIT);
    let before = settled(&k, "slow");
    let warm_up = before["requests"].as_u64().unwrap_or(0);
    // 90% at 20 ms, 10% at 300 ms: p50 is 20 ms, p95 and p99 300 ms. The requests the test
    // made until the app answered (a few, at under a millisecond) move none of them.
    assert!(warm_up < 40, "{warm_up} requests before the mix");
    // Each request's upstream time lies between the app's sleep and the time the client saw:
    // the truth is known within those bounds, however loaded the machine is.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = k.addr();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for i in 0..50 {
                    let ms = if (i + t * 50) % 10 == 0 { 300 } else { 20 };
                    let start = Instant::now();
                    let r = keter::probe::get_tcp(
                        addr,
                        host,
                        &format!("/slow?ms={ms}"),
                        Duration::from_secs(10),
                    )
                    .unwrap();
                    assert_eq!(r.status, 200);
                    seen.push((ms, start.elapsed().as_secs_f64()));
                }
                seen
            })
        })
        .collect();
    let seen: Vec<(u64, f64)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut made: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    made.insert("2xx", 200);
    let r = wait_counts(&k, "slow", &before, &made);
    let q = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    // The client's quantile: an upper bound of the truth's.
    let client = |quantile: f64| {
        let mut t: Vec<f64> = seen.iter().map(|(_, s)| *s).collect();
        t.sort_by(f64::total_cmp);
        t[((t.len() as f64 * quantile).ceil() as usize).clamp(1, t.len()) - 1]
    };
    // The upper bound of the bucket above the one holding `x`.
    let bucket_above = |x: f64| {
        let b = &keter::requests::LATENCY_BUCKETS;
        let i = b.iter().position(|u| x <= *u).unwrap_or(b.len() - 1);
        b[(i + 1).min(b.len() - 1)]
    };
    // Truth at least 20 ms, in the bucket (10, 25] ms: one bucket below from 5 ms; at most the
    // client's p50, one bucket above it.
    let p50 = q("upstream_seconds_p50");
    assert!(
        (0.005..=bucket_above(client(0.5))).contains(&p50),
        "p50 {p50}, the client's {}",
        client(0.5)
    );
    // Truth at least 300 ms, in the bucket (250, 500] ms.
    for (p, quantile) in [
        ("upstream_seconds_p95", 0.95),
        ("upstream_seconds_p99", 0.99),
    ] {
        assert!(
            (0.1..=bucket_above(client(quantile))).contains(&q(p)),
            "{p} {}, the client's {}",
            q(p),
            client(quantile)
        );
    }
    // The histogram at /metrics: each 20 ms request above 10 ms, and at most 50 ms when the
    // client saw it within 50 ms; each 300 ms request above 250 ms.
    let m = Metrics::parse(&page(&k, "/metrics"));
    let release = r["releases"][0]["release"].as_u64().unwrap().to_string();
    let le = |b: &str| {
        m.get(
            "keter_app_upstream_response_seconds_bucket",
            &[("app", "slow"), ("release", &release), ("le", b)],
        )
    };
    let fast_within = |s: f64| seen.iter().filter(|(ms, t)| *ms == 20 && *t <= s).count() as f64;
    let fast_within_50ms = fast_within(0.05);
    // The requests before the mix (at the start, well under 10 ms as a rule) may add to both.
    let warm_up = warm_up as f64;
    let between = le("0.05") - le("0.01");
    assert!(
        (fast_within_50ms..=180.0 + warm_up).contains(&between),
        "{between} between 10 and 50 ms; the client saw {fast_within_50ms} of the 20 ms requests within 50 ms"
    );
    let above = le("+Inf") - le("0.25");
    assert!(
        (20.0..=20.0 + 180.0 - fast_within(0.25) + warm_up).contains(&above),
        "{above} above 250 ms"
    );
    // Tells something only if the machine let most requests through in time.
    assert!(
        fast_within_50ms >= 90.0,
        "{fast_within_50ms} of 180 within 50 ms: too loaded"
    );
}

#[test]
fn a_stopped_keter_blocks_no_request_and_loses_none() {
    let k = Keter::start_with(
        "metrics-sigstop",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let host = "busy.example.com";
    k.deploy_hello("busy", "v1", host, &[]);
    k.wait_for(host, "v1", WAIT);
    let before = settled(&k, "busy");
    let keter = nix::unistd::Pid::from_raw(k.pid());
    nix::sys::signal::kill(keter, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Thousands of requests while nobody reads the log.
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let addr = k.addr();
            std::thread::spawn(move || {
                let mut client = KeepAliveClient::new(addr);
                let mut ok = 0;
                for _ in 0..1500 {
                    let r = client.get(host, "/").unwrap();
                    assert_eq!(r.status, 200);
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let ok: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let took = start.elapsed();
    nix::sys::signal::kill(keter, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(ok, 6000);
    eprintln!("6000 requests in {took:?} while keter was stopped");
    // Nothing was lost: the log kept what keter did not read, and keter reads it once resumed.
    let mut made: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    made.insert("2xx", 6000);
    let after = wait_counts(&k, "busy", &before, &made);
    for _ in 0..25 {
        assert_eq!(k.get(host, "/").unwrap().status, 200);
    }
    made.insert("2xx", 25);
    wait_counts(&k, "busy", &after, &made);
}

/// The request log grown past its bound is renamed and the real Nginx reopens it (SIGUSR1):
/// no request is lost across the rotation, and a keter upgraded in place reads both files
/// again, so its counts carry on.
#[test]
fn the_request_log_rotates_with_nginx_and_its_counts_survive_an_upgrade() {
    use std::io::Write;
    let k = Keter::start_with(
        "metrics-rotate",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let host = "rot.example.com";
    k.deploy_hello("rot", "v1", host, &[]);
    k.wait_for(host, "v1", WAIT);
    let log = k.root.join("nginx/worker-files/requests.log");
    let renamed = k.root.join("nginx/worker-files/requests.log.1");
    let first = settled(&k, "rot");
    assert!(log.exists() && !renamed.exists());
    // 65 MiB of lines that are not keter's, past the 64 MiB bound, as a busy Nginx would have
    // written; then keter renames the file and Nginx opens a new one.
    let junk = vec![b'x'; 1023]
        .into_iter()
        .chain([b'\n'])
        .collect::<Vec<u8>>();
    let mut append = fs::OpenOptions::new().append(true).open(&log).unwrap();
    for _ in 0..65 * 1024 {
        append.write_all(&junk).unwrap();
    }
    drop(append);
    let start = Instant::now();
    while !(renamed.exists() && log.exists()) {
        assert!(
            start.elapsed() < WAIT,
            "the log was not rotated\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut made: BTreeMap<&str, u64> = CLASSES.iter().map(|c| (*c, 0)).collect();
    made.insert("2xx", 30);
    for _ in 0..30 {
        assert_eq!(k.get(host, "/").unwrap().status, 200);
    }
    let after = wait_counts(&k, "rot", &first, &made);
    assert!(
        fs::metadata(&log).unwrap().len() > 0,
        "Nginx writes into the new file"
    );
    let m = Metrics::parse(&page(&k, "/metrics"));
    assert_eq!(
        m.get(
            "keter_request_log_lines_dropped_total",
            &[("reason", "malformed")]
        ),
        65.0 * 1024.0
    );

    // Upgraded in place, keter starts with no counts and reads both files again.
    k.signal(nix::sys::signal::Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    let again = settled(&k, "rot");
    assert_eq!(classes(&again), classes(&after), "{}", k.log());
}

#[test]
fn plots_show_the_requests_in_a_browser() {
    let k = Keter::start_with(
        "metrics-plots",
        Opts {
            status: StatusAt::Tcp,
            ..Opts::default()
        },
    );
    let host = "plotted.example.com";
    k.deploy_hello("plotted", "v1", host, &[]);
    k.deploy_hello("quiet", "v1", "quiet.example.com", &[]);
    k.wait_for(host, "v1", WAIT);
    k.wait_for("quiet.example.com", "v1", WAIT);
    for i in 0..120 {
        let path = match i % 10 {
            0 => "/status?code=500",
            1 => "/slow?ms=40",
            _ => "/",
        };
        k.get(host, path).unwrap();
    }
    let start = Instant::now();
    while json(&k, "/api/apps/plotted")["requests"]["requests"]
        .as_u64()
        .unwrap_or(0)
        < 120
    {
        assert!(start.elapsed() < WAIT, "the requests were never counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(StatusAddress::Tcp(addr)) = k.status.clone() else {
        unreachable!()
    };
    let base = format!("http://{addr}");
    let profile = |n: &str| k.dir.0.join(format!("chromium-{n}"));
    let select = |doc: &Html, css: &str| -> Vec<String> {
        doc.select(&Selector::parse(css).unwrap())
            .map(|e| e.html())
            .collect()
    };
    let attr = |doc: &Html, css: &str, name: &str| -> String {
        doc.select(&Selector::parse(css).unwrap())
            .next()
            .unwrap_or_else(|| panic!("no {css}"))
            .value()
            .attr(name)
            .unwrap_or_default()
            .to_string()
    };

    // The app page as the browser has it: four plots, every series drawn, requests and
    // errors above zero in the current slots, the deploy on the time axis.
    let dom = browse(
        &profile("app"),
        &format!("{base}/apps/plotted"),
        &["--dump-dom", "--virtual-time-budget=3000"],
    );
    let doc = Html::parse_document(&dom);
    assert_eq!(select(&doc, "svg.plot").len(), 4, "{dom}");
    for id in ["hour-rate", "day-rate"] {
        for series in ["requests/s", "errors/s"] {
            let d = attr(
                &doc,
                &format!("svg#{id} path[data-series=\"{series}\"]"),
                "d",
            );
            // Some point above the zero line (y of zero is the plot's bottom).
            let ys: Vec<f64> = d
                .split(['M', 'L'])
                .filter_map(|p| p.split(' ').nth(1)?.parse().ok())
                .collect();
            let bottom = ys.iter().cloned().fold(0.0, f64::max);
            assert!(ys.iter().any(|y| *y < bottom - 1.0), "{id} {series}: {d}");
        }
    }
    for id in ["hour-latency", "day-latency"] {
        for series in ["p50", "p95", "p99"] {
            let n: u32 = attr(
                &doc,
                &format!("svg#{id} path[data-series=\"{series}\"]"),
                "data-points",
            )
            .parse()
            .unwrap();
            assert!(n >= 1, "{id} {series}");
        }
    }
    assert!(
        !select(&doc, "svg#hour-rate g.mark[data-kind=\"deploy\"]").is_empty(),
        "no deploy on the time axis: {dom}"
    );
    assert!(
        attr(&doc, "#requests-summary", "id") == "requests-summary"
            && dom.contains("requests since keter started")
    );
    // The overview: a rate line for the app with requests.
    let dom = browse(
        &profile("overview"),
        &format!("{base}/"),
        &["--dump-dom", "--virtual-time-budget=3000"],
    );
    let doc = Html::parse_document(&dom);
    let spark = attr(
        &doc,
        "tr[data-app=\"plotted\"] svg.spark polyline",
        "points",
    );
    assert!(spark.split(' ').count() >= 2, "{spark}");

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-screenshots");
    fs::create_dir_all(&shots).unwrap();
    for (name, url, size) in [
        (
            "metrics-app.png",
            format!("{base}/apps/plotted"),
            "1280,1400",
        ),
        ("metrics-overview.png", format!("{base}/"), "1600,700"),
        (
            "metrics-app-phone.png",
            format!("{base}/apps/plotted"),
            "390,1400",
        ),
    ] {
        screenshot(&k.dir.0, &shots, name, &url, size);
    }
}
