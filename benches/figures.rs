//! keter's figures, each side by side with its baseline in the same run: deploy latency by
//! bundle size (and unpack throughput against `tar xzf`), redeploys under load with `wrk`,
//! the front end's overhead against the app reached directly, 200 apps at once, what
//! isolation costs a deploy (apps as users of their own against `run-apps-as-root`, and against
//! another build of keter named by `KETER_BEFORE`, to measure a change), and what checking
//! static files' symlinks costs Nginx (with and without `disable_symlinks`), and what keter
//! spends per line of Nginx's request log.
//!
//! Run: `cargo bench --bench figures` (release build, real Nginx; installs nothing: `wrk` must
//! be on PATH, `apt-get install wrk`). About seven minutes on two cores. One figure alone:
//! `cargo bench --bench figures isolation`; with `KETER_BEFORE=/path/to/keter` its table has a
//! row for that build too, deployed in turn with this one. `cargo bench --bench figures
//! instructions` (only when named; it needs valgrind) counts the instructions of Nginx's
//! worker per proxied request, keter's configuration against hand-written ones.

#[path = "../tests/integration/support.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn main() {
    require_nginx();
    assert!(
        Command::new("wrk").arg("--version").output().is_ok(),
        "wrk is not installed: apt-get install wrk"
    );
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("latency") {
        deploy_latency();
    }
    if run("load") {
        redeploy_under_load();
    }
    if run("overhead") {
        front_end_overhead();
    }
    if run("many") {
        many_apps();
    }
    if run("isolation") {
        isolation_cost();
    }
    if run("symlinks") {
        symlink_check_cost();
    }
    if run("counting") {
        counting_cost();
    }
    // Only when asked for: it needs valgrind.
    if only.as_deref() == Some("instructions") {
        nginx_instructions();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A bundle of about `size` bytes whose app is a two-line script starting the example app
/// (so the app's own start time is the same for every size).
fn sized_bundle(path: &Path, version: &str, host: &str, size: usize) {
    let script = format!(
        "#!/bin/sh\nexec {} --version-string {version}\n",
        hello_binary().display()
    );
    BundleBuilder::new()
        .file("dist/run", script.into_bytes(), 0o755)
        .file(
            "config/keter.yaml",
            format!("exec: ../dist/run\nhost: {host}\n").into_bytes(),
            0o644,
        )
        .file(
            "static/blob",
            noise(size, version.len() as u64 + size as u64),
            0o644,
        )
        .write(path);
}

fn deploy_latency() {
    const RUNS: usize = 11;
    // The app alone: exec of the same script to its first answer.
    let dir = TempDir::new("bench-own");
    let script = dir.0.join("run");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --version-string own\n",
            hello_binary().display()
        ),
    )
    .unwrap();
    set_mode(&script, 0o755);
    let mut own: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let port = free_port();
            let start = Instant::now();
            let mut child = Command::new(&script)
                .env("PORT", port.to_string())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            while keter::probe::get_tcp(addr, "x", "/", Duration::from_secs(1)).is_err() {
                std::thread::sleep(Duration::from_micros(300));
            }
            let took = start.elapsed();
            child.kill().unwrap();
            child.wait().unwrap();
            took
        })
        .collect();
    let own = median(&mut own);

    println!(
        "\n1. deploy latency (medians of {RUNS} redeploys; app alone {:.1} ms from exec to first answer)",
        ms(own)
    );
    println!(
        "   {:>10} {:>14} {:>16} {:>12} {:>14}",
        "bundle", "rename->answer", "keter overhead", "unpack MB/s", "tar xzf MB/s"
    );
    for (label, size) in [
        ("100 KB", 100 * 1024),
        ("10 MB", 10 << 20),
        ("200 MB", 200 << 20),
    ] {
        let k = Keter::start_with(
            "bench-latency",
            Opts {
                drain_time: 1.0,
                ports: 60,
                ..Opts::default()
            },
        );
        let host = "size.example.com";
        let mut times = Vec::new();
        let mut unpack = Vec::new();
        for i in 0..=RUNS {
            let path = k.dir.0.join(format!("b{i}.keter"));
            let version = format!("v{i}");
            sized_bundle(&path, &version, host, size);
            let staged = k.incoming().join(".size.part");
            fs::copy(&path, &staged).unwrap();
            let start = Instant::now();
            fs::rename(&staged, k.incoming().join("size.keter")).unwrap();
            loop {
                if let Ok(r) = k.get(host, "/")
                    && r.body.trim() == version
                {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(120), "{}", k.log());
                std::thread::sleep(Duration::from_micros(500));
            }
            if i > 0 {
                times.push(start.elapsed());
            }
            // Unpack time from keter's own log line of this deploy.
            if let Some(line) = k.log().lines().rfind(|l| l.contains("size: unpacked"))
                && let Some(t) = line
                    .split(" in ")
                    .last()
                    .and_then(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
            {
                unpack.push(t);
            }
            std::thread::sleep(Duration::from_millis(1200));
        }
        let bundle = k.dir.0.join("b0.keter");
        let unpacked_mb = (size as f64 + 4096.0) / 1e6;
        unpack.sort_by(|a, b| a.total_cmp(b));
        let keter_rate = unpacked_mb / (unpack[unpack.len() / 2].max(0.1) / 1000.0);
        let tar_rate = tar_rate(&bundle, unpacked_mb);
        let m = median(&mut times);
        println!(
            "   {:>10} {:>11.1} ms {:>13.1} ms {:>12.0} {:>14.0}   ({:.2} of tar)",
            label,
            ms(m),
            ms(m.saturating_sub(own)),
            keter_rate,
            tar_rate,
            keter_rate / tar_rate
        );
    }
}

/// `tar xzf` of the same bundle: median MB/s of 5 runs.
fn tar_rate(bundle: &Path, unpacked_mb: f64) -> f64 {
    let mut times = Vec::new();
    for i in 0..5 {
        let dest = bundle.with_extension(format!("tar{i}"));
        fs::create_dir_all(&dest).unwrap();
        let start = Instant::now();
        let ok = Command::new("tar")
            .arg("xzf")
            .arg(bundle)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap()
            .success();
        times.push(start.elapsed());
        assert!(ok);
        fs::remove_dir_all(&dest).unwrap();
    }
    unpacked_mb / median(&mut times).as_secs_f64()
}

/// wrk's requests/s, p99 latency and errors (non-2xx plus socket errors).
struct Wrk {
    rps: f64,
    p99_ms: f64,
    errors: u64,
    requests: u64,
    /// wrk's own line, e.g. `Socket errors: connect 0, read 12, write 0, timeout 0`.
    detail: String,
}

fn wrk(url: &str, host: &str, seconds: u64, connections: u32, close: bool) -> std::process::Child {
    wrk_threads(1, url, host, seconds, connections, close)
}

fn wrk_threads(
    threads: u32,
    url: &str,
    host: &str,
    seconds: u64,
    connections: u32,
    close: bool,
) -> std::process::Child {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t",
        &threads.to_string(),
        "-c",
        &connections.to_string(),
        "-d",
        &format!("{seconds}s"),
        "--latency",
    ])
    .args(["-H", &format!("Host: {host}")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url).stdout(Stdio::piped()).stderr(Stdio::null());
    cmd.spawn().unwrap()
}

fn wrk_result(child: std::process::Child) -> Wrk {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let number = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_wrk_time(v.trim()))
        .unwrap_or(f64::NAN);
    let mut errors = 0;
    if let Some(l) = text.lines().find(|l| l.contains("Socket errors:")) {
        errors += l
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = number("Non-2xx or 3xx responses:") {
        errors += n as u64;
    }
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let detail = text
        .lines()
        .filter(|l| l.contains("Socket errors:") || l.contains("Non-2xx"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Wrk {
        rps: number("Requests/sec:").unwrap_or(0.0),
        p99_ms: p99,
        errors,
        requests,
        detail,
    }
}

fn parse_wrk_time(v: &str) -> f64 {
    if let Some(x) = v.strip_suffix("us") {
        x.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
    } else if let Some(x) = v.strip_suffix("ms") {
        x.parse().unwrap_or(f64::NAN)
    } else if let Some(x) = v.strip_suffix('s') {
        x.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
    } else {
        f64::NAN
    }
}

fn redeploy_under_load() {
    let k = Keter::start_with(
        "bench-load",
        Opts {
            drain_time: 2.0,
            ports: 60,
            ..Opts::default()
        },
    );
    let host = "load.example.com";
    let bundles: Vec<PathBuf> = (0..=20)
        .map(|i| {
            let p = k.dir.0.join(format!("l{i}.keter"));
            BundleBuilder::hello(&hello_yaml(&format!("v{i}"), host, &[])).write(&p);
            p
        })
        .collect();
    k.deploy("load", &bundles[0]);
    k.wait_for(host, "v0", Duration::from_secs(30));
    let url = format!("http://127.0.0.1:{}/", k.port);
    let mut next = 1;
    let mut redeploy_20 = || {
        // The redeploys are spread over the whole window (one every PACE, or back to back
        // when one takes longer), so that every second of it is a second with redeploys.
        const PACE: Duration = Duration::from_millis(900);
        let start = Instant::now();
        for i in 1..=20u32 {
            let due = PACE * i - PACE / 2;
            std::thread::sleep(due.saturating_sub(start.elapsed()));
            k.deploy("load", &bundles[next]);
            k.wait_for(host, &format!("v{next}"), Duration::from_secs(30));
            next = (next + 1) % bundles.len();
        }
        start.elapsed()
    };
    let seconds = 20;

    // Throughput and failures: wrk at full speed, both clients at once, the same length with
    // and without redeploys.
    let steady_ka = wrk(&url, host, seconds, 16, false);
    let steady_new = wrk(&url, host, seconds, 4, true);
    let (steady_ka, steady_new) = (wrk_result(steady_ka), wrk_result(steady_new));
    let ka = wrk(&url, host, seconds, 16, false);
    let new = wrk(&url, host, seconds, 4, true);
    let took = redeploy_20();
    let (during_ka, during_new) = (wrk_result(ka), wrk_result(new));
    println!(
        "\n2. redeploy under load: wrk with 16 keep-alive connections and wrk with 4 connections \
         sending Connection: close, {seconds} s each, without and with 20 redeploys (done after \
         {:.1} s)",
        took.as_secs_f64()
    );
    println!(
        "   {:<28} {:>10} {:>10} {:>10} {:>10}",
        "", "req/s", "p99 ms", "requests", "failed"
    );
    for (label, w) in [
        ("keep-alive, steady", &steady_ka),
        ("keep-alive, redeploying", &during_ka),
        ("new connections, steady", &steady_new),
        ("new connections, redeploying", &during_new),
    ] {
        println!(
            "   {:<28} {:>10.0} {:>10.2} {:>10} {:>10}",
            label, w.rps, w.p99_ms, w.requests, w.errors
        );
        if !w.detail.is_empty() {
            println!("   {:<28} {}", "", w.detail);
        }
    }

    // Latency: the same two kinds of client at a fixed rate far below capacity, so that the
    // percentiles show what a redeploy costs a request rather than how an overloaded machine
    // shares its two cores (wrk at full speed measures the latter).
    let addr = k.addr();
    let run = |seconds: u64| {
        let d = Duration::from_secs(seconds);
        let ka = paced(addr, host, true, 8, 250.0, d);
        let new = paced(addr, host, false, 4, 100.0, d);
        (ka, new)
    };
    let (ka, new) = run(seconds);
    let (steady_ka, steady_new) = (Paced::join(ka), Paced::join(new));
    let (ka, new) = run(seconds);
    let took = redeploy_20();
    let (during_ka, during_new) = (Paced::join(ka), Paced::join(new));
    println!(
        "\n   at a fixed rate, 2000 req/s on 8 keep-alive connections and 400 req/s on new \
         connections, {seconds} s each, without and with 20 redeploys (done after {:.1} s); \
         latency from the moment each request was due",
        took.as_secs_f64()
    );
    println!(
        "   {:<28} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "requests", "failed"
    );
    for (label, p) in [
        ("keep-alive, steady", &steady_ka),
        ("keep-alive, redeploying", &during_ka),
        ("new connections, steady", &steady_new),
        ("new connections, redeploying", &during_new),
    ] {
        println!(
            "   {:<28} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10} {:>10}",
            label,
            p.quantile(0.5),
            p.quantile(0.99),
            p.quantile(0.999),
            p.quantile(1.0),
            p.latencies.len(),
            p.failed
        );
    }
    println!(
        "   p99 redeploying / steady: keep-alive {:.2}x, new connections {:.2}x; keep-alive \
         requests resent after an idle close: {}",
        during_ka.quantile(0.99) / steady_ka.quantile(0.99),
        during_new.quantile(0.99) / steady_new.quantile(0.99),
        during_ka.resent
    );
}

/// What a paced client saw: latencies in microseconds, failures, and requests resent on a
/// new connection because the server had closed the idle one before reading them.
#[derive(Default)]
struct Paced {
    latencies: Vec<u32>,
    failed: u64,
    resent: u64,
}

impl Paced {
    fn join(threads: Vec<std::thread::JoinHandle<Paced>>) -> Paced {
        let mut all = Paced::default();
        for t in threads {
            let p = t.join().unwrap();
            all.latencies.extend(p.latencies);
            all.failed += p.failed;
            all.resent += p.resent;
        }
        all.latencies.sort_unstable();
        all
    }

    /// In milliseconds.
    fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }
}

/// `connections` threads, each sending `rate` requests per second for `length`, on one
/// keep-alive connection or on a new connection per request. A request's latency counts from
/// when it was due, so a stall delays and counts against every request behind it.
fn paced(
    addr: std::net::SocketAddr,
    host: &'static str,
    keep_alive: bool,
    connections: usize,
    rate: f64,
    length: Duration,
) -> Vec<std::thread::JoinHandle<Paced>> {
    (0..connections)
        .map(|c| {
            std::thread::spawn(move || {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let start = Instant::now() + interval.mul_f64(c as f64 / connections as f64);
                let mut client = KeepAliveClient::new(addr);
                let mut out = Paced::default();
                let mut due = start;
                while due < start + length {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let answer = if keep_alive {
                        client.get(host, "/")
                    } else {
                        keter::probe::get_tcp(addr, host, "/", Duration::from_secs(5))
                    };
                    match answer {
                        Ok(r) if r.status == 200 => {
                            out.latencies.push(due.elapsed().as_micros() as u32)
                        }
                        _ => out.failed += 1,
                    }
                    due += interval;
                }
                out.resent = u64::from(client.resent_after_idle_close);
                out
            })
        })
        .collect()
}

/// An Nginx started by the bench itself from a hand-written configuration, stopped (master
/// and workers) when dropped, also when the bench panics.
struct OwnNginx {
    child: std::process::Child,
    dir: TempDir,
}

impl OwnNginx {
    /// Writes `DIR/nginx.conf` with `worker_processes auto`, `main` in its main context and
    /// `http` as its http block's servers, every path under `dir`.
    fn write_conf(dir: &Path, main: &str, http: &str) -> PathBuf {
        let d = dir.display();
        // `access_log off` beside another `access_log` of the same block turns that one off
        // too: a proxy with a log line gets no `off`.
        let off = if http.contains("access_log ") {
            ""
        } else {
            "    access_log off;\n"
        };
        fs::create_dir_all(dir.join("t")).unwrap();
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "{main}worker_processes auto;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n{off}    client_body_temp_path {d}/t; proxy_temp_path {d}/t; fastcgi_temp_path {d}/t; uwsgi_temp_path {d}/t; scgi_temp_path {d}/t;\n{http}}}\n"
            ),
        )
        .unwrap();
        conf
    }

    /// `nginx` with `worker_processes auto` (as keter's), `main` in its main context and
    /// `http` as its http block's servers; returns once `port` answers `GET path` for `host`
    /// with `expect`.
    fn start(
        label: &str,
        main: &str,
        http: &str,
        port: u16,
        host: &str,
        path: &str,
        expect: &str,
    ) -> OwnNginx {
        let dir = TempDir::new(label);
        let conf = OwnNginx::write_conf(&dir.0, main, http);
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-p"])
            .arg(&dir.0)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.0.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut nginx = OwnNginx { child, dir };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        loop {
            if let Ok(r) = keter::probe::get_tcp(addr, host, path, Duration::from_secs(1))
                && r.body.trim() == expect
            {
                return nginx;
            }
            let exited = nginx.child.try_wait().unwrap();
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(10),
                "{label}: nginx does not answer on port {port} ({exited:?}): {}",
                fs::read_to_string(nginx.dir.0.join("stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnNginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// CPU time used so far by the workers of the Nginx whose master is `master`, in µs
/// (`/proc/PID/schedstat`: nanoseconds on a CPU).
fn workers_cpu_us(master: i32) -> f64 {
    keter::procfs::nginx_workers(master)
        .iter()
        .filter_map(|(pid, _)| {
            let stat = fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
            stat.split(' ').next()?.parse::<f64>().ok()
        })
        .sum::<f64>()
        / 1000.0
}

/// A minimal proxy to the app on `app_port`, listening on `port`, with or without keep-alive
/// connections to the app; `log` goes into its http block (a `log_format` and an
/// `access_log`, or nothing for `access_log off`).
fn hand_tuned_proxy(label: &str, port: u16, app_port: u16, keepalive: bool, log: &str) -> OwnNginx {
    let http = hand_tuned_http(port, app_port, keepalive, log);
    OwnNginx::start(label, "", &http, port, "fast.example.com", "/", "fast")
}

/// The http block's servers of [`hand_tuned_proxy`].
fn hand_tuned_http(port: u16, app_port: u16, keepalive: bool, log: &str) -> String {
    let (pool, connection) = if keepalive {
        ("keepalive 32; ", "proxy_set_header Connection \"\"; ")
    } else {
        ("", "")
    };
    format!(
        "{log}    upstream app {{ server 127.0.0.1:{app_port}; {pool}}}\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{ proxy_pass http://app; proxy_http_version 1.1; {connection}}}\n    }}\n"
    )
}

/// The hand-tuned proxy forwarding what keter's Nginx forwards to an app
/// (`templates/app.conf.tera`): the client's host, address and scheme, and websocket
/// upgrades; no log.
fn hand_tuned_proxy_forwarding(label: &str, port: u16, app_port: u16) -> OwnNginx {
    let http = forwarding_http(port, app_port);
    OwnNginx::start(label, "", &http, port, "fast.example.com", "/", "fast")
}

/// The http block's servers of [`hand_tuned_proxy_forwarding`].
fn forwarding_http(port: u16, app_port: u16) -> String {
    format!(
        "    map $http_upgrade $u {{ default upgrade; '' ''; }}\n    upstream app {{ server 127.0.0.1:{app_port}; keepalive 32; }}\n    server {{\n        listen 127.0.0.1:{port};\n        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Host $host; proxy_set_header X-Real-IP $remote_addr; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto http; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $u; }}\n    }}\n"
    )
}

/// keter's log format, as `templates/app.conf.tera` writes it for an app.
const KETER_LOG_FORMAT: &str = "    log_format m escape=none 'k3|fast|1|$time_iso8601|$status|$bytes_sent|$upstream_response_time|$upstream_header_time';\n";

/// A unix datagram socket read and thrown away by a thread: what the hand-tuned proxy's
/// syslog `access_log` sends to, as keter's reads its own.
fn datagram_sink(
    path: &Path,
) -> (
    std::os::unix::net::UnixDatagram,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::remove_file(path);
    let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    // The workers run as nobody.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).unwrap();
    let reader = socket.try_clone().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = received.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while reader.recv(&mut buf).is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (socket, received)
}

/// The app of the front-end figures: an Nginx answering a fixed string on `$PORT`, as fast an
/// app as there is.
const FAST_APP: &str = "#!/bin/sh\nset -e\nd=$(mktemp -d)\nmkdir -p \"$d/t\"\ncat > \"$d/n.conf\" <<EOF\nworker_processes 1;\npid $d/pid;\nerror_log stderr error;\nevents { worker_connections 1024; }\nhttp { access_log off; client_body_temp_path $d/t; proxy_temp_path $d/t; fastcgi_temp_path $d/t; uwsgi_temp_path $d/t; scgi_temp_path $d/t;\n server { listen 127.0.0.1:$PORT; keepalive_requests 100000; location / { return 200 \"fast\\n\"; } } }\nEOF\nexec /usr/sbin/nginx -e stderr -p \"$d\" -c \"$d/n.conf\" -g 'daemon off;'\n";

/// Deploys the fast app as `fast` on `fast.example.com` into each of `keters` and returns its
/// port in the first (each keter runs it on its own port).
fn deploy_fast_app(keters: &[&Keter]) -> u16 {
    let host = "fast.example.com";
    let bundle = keters[0].dir.0.join("fast.keter");
    BundleBuilder::new()
        .file("dist/run", FAST_APP.as_bytes().to_vec(), 0o755)
        .file(
            "config/keter.yaml",
            format!("exec: ../dist/run\nhost: {host}\n").into_bytes(),
            0o644,
        )
        .write(&bundle);
    for k in keters {
        k.deploy("fast", &bundle);
        k.wait_for(host, "fast", Duration::from_secs(30));
    }
    fs::read_to_string(keters[0].root.join("nginx/apps/fast.conf"))
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("server 127.0.0.1:"))
        .and_then(|p| p.trim_end_matches(';').parse::<u16>().ok())
        .unwrap()
}

/// `cargo bench --bench figures overhead` or `cargo bench --bench figures -- overhead ROUNDS
/// PAIRS` (9 rounds and 20 pairs unless told); with `KETER_BEFORE=/path/to/keter`, that build's
/// Nginx with metrics on is one more target, compared with this build's round by round.
fn front_end_overhead() {
    let rounds: usize = std::env::args()
        .nth(2)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("overhead ROUNDS: a number of rounds"))
        .unwrap_or(9);
    const SECONDS: u64 = 2;
    let k = Keter::start_with("bench-overhead", Opts::default());
    // The same keter without request metrics (`request-metrics: false`), same app.
    let off = Keter::start_with(
        "bench-overhead-off",
        Opts {
            extra: "request-metrics: false\n".into(),
            ..Opts::default()
        },
    );
    // With `KETER_BEFORE`, that build too, metrics on, to measure a change side by side.
    let before = std::env::var_os("KETER_BEFORE").map(|b| {
        Keter::start_with(
            "bench-overhead-before",
            Opts {
                binary: Some(PathBuf::from(b)),
                ..Opts::default()
            },
        )
    });
    let host = "fast.example.com";
    let mut keters = vec![&k, &off];
    keters.extend(&before);
    let app_port = deploy_fast_app(&keters);
    // Hand-written proxies to the same app, beside keter's Nginx, for the same clients.
    let tuned_port = free_port();
    let tuned = hand_tuned_proxy("bench-tuned", tuned_port, app_port, true, "");
    let plain_port = free_port();
    let plain = hand_tuned_proxy("bench-no-keepalive", plain_port, app_port, false, "");
    // The ways of getting a line per request out of Debian's Nginx, on the hand-tuned proxy:
    // a syslog datagram per request to a unix socket (what keter did before), and a buffered
    // access log file (64 KiB, flushed every second: what keter does, without keter reading).
    let logs = TempDir::new("bench-overhead-logs");
    let sink_path = logs.0.join("sink.sock");
    let (_sink, datagrams) = datagram_sink(&sink_path);
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&logs.0, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let syslog_port = free_port();
    let syslog = hand_tuned_proxy(
        "bench-tuned-syslog",
        syslog_port,
        app_port,
        true,
        &format!(
            "{KETER_LOG_FORMAT}    access_log syslog:server=unix:{},nohostname,tag=keter m;\n",
            sink_path.display()
        ),
    );
    let file_port = free_port();
    let file_log = logs.0.join("access.log");
    let buffered = hand_tuned_proxy(
        "bench-tuned-file",
        file_port,
        app_port,
        true,
        &format!(
            "{KETER_LOG_FORMAT}    access_log {} m buffer=64k flush=1s;\n",
            file_log.display()
        ),
    );
    let forwarding_port = free_port();
    let forwarding =
        hand_tuned_proxy_forwarding("bench-tuned-forwarding", forwarding_port, app_port);
    // (label, port, master of the front end's Nginx).
    let mut targets = vec![
        ("app directly", app_port, None),
        ("keter's Nginx, metrics on", k.port, Some(k.nginx_pid())),
        (
            "keter's Nginx, metrics off",
            off.port,
            Some(off.nginx_pid()),
        ),
        (
            "hand-tuned Nginx",
            tuned_port,
            Some(tuned.child.id() as i32),
        ),
        (
            "same, syslog datagram per request",
            syslog_port,
            Some(syslog.child.id() as i32),
        ),
        (
            "same, buffered access log file",
            file_port,
            Some(buffered.child.id() as i32),
        ),
        (
            "same, no upstream keep-alive",
            plain_port,
            Some(plain.child.id() as i32),
        ),
        (
            "same, forwarding keter's headers",
            forwarding_port,
            Some(forwarding.child.id() as i32),
        ),
    ];
    if let Some(b) = &before {
        targets.push(("KETER_BEFORE, metrics on", b.port, Some(b.nginx_pid())));
    }
    // keter's own CPU while it counts what its Nginx logs: (target, keter, CPU ns, requests).
    let mut keters: Vec<(usize, &Keter, u64, u64)> = vec![(1, &k, 0, 0)];
    if let Some(b) = &before {
        keters.push((targets.len() - 1, b, 0, 0));
    }
    // Round-robin over the targets, each round starting one target further, so that a slow
    // moment of the machine (the load tool, the front ends and the app share its cores) falls
    // on every target alike; medians per target. The CPU time of the front end's workers per
    // request hardly depends on how busy the machine is, unlike req/s.
    let mut runs: Vec<Vec<(Wrk, f64)>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for i in 0..targets.len() {
            let t = (round + i) % targets.len();
            let (_, port, master) = targets[t];
            let cpu = || master.map_or(0.0, workers_cpu_us);
            let before = cpu();
            let keter_before: Vec<u64> = keters
                .iter()
                .map(|(_, k, _, _)| threads_cpu_ns(k.pid()))
                .collect();
            let w = wrk_result(wrk_threads(
                2,
                &format!("http://127.0.0.1:{port}/"),
                host,
                SECONDS,
                16,
                false,
            ));
            // Nginx writes a buffered log at most a second after a request, and keter reads it
            // within a quarter of a second more: both are counted in this target's round.
            std::thread::sleep(Duration::from_millis(1500));
            let per_request = (cpu() - before) / w.requests.max(1) as f64;
            for (j, (target, k, ns, requests)) in keters.iter_mut().enumerate() {
                if *target == t {
                    *ns += threads_cpu_ns(k.pid()) - keter_before[j];
                    *requests += w.requests;
                }
            }
            runs[t].push((w, per_request));
        }
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    // Per target: median req/s, median p99, median front-end CPU µs per request,
    // (max - min) / median of req/s, errors.
    let rows: Vec<(f64, f64, f64, f64, u64)> = runs
        .iter()
        .map(|r| {
            let (rps, min, max) = median_of(r.iter().map(|(w, _)| w.rps).collect());
            let (p99, _, _) = median_of(r.iter().map(|(w, _)| w.p99_ms).collect());
            let (cpu, _, _) = median_of(r.iter().map(|(_, c)| *c).collect());
            (
                rps,
                p99,
                cpu,
                (max - min) / rps,
                r.iter().map(|(w, _)| w.errors).sum(),
            )
        })
        .collect();
    println!(
        "\n3. front-end overhead (wrk -t2 -c16, keep-alive; {rounds} rounds of {SECONDS} s runs over the {} targets in turn, medians)",
        targets.len()
    );
    println!(
        "   {:<30} {:>10} {:>10} {:>10} {:>12} {:>8} {:>8}",
        "", "req/s", "p99 ms", "of direct", "front µs/req", "spread", "errors"
    );
    for ((label, _, master), (rps, p99, cpu, spread, errors)) in targets.iter().zip(&rows) {
        let cpu = match master {
            Some(_) => format!("{cpu:.1}"),
            None => "-".to_string(),
        };
        println!(
            "   {:<30} {:>10.0} {:>10.2} {:>10.2} {:>12} {:>7.0}% {:>8}",
            label,
            rps,
            p99,
            rps / rows[0].0,
            cpu,
            spread * 100.0,
            errors
        );
    }
    // keter against the hand-tuned proxy also run by run: the two are measured within seconds
    // of each other in every round.
    let paired = |a: usize, b: usize| {
        let (rps, _, _) = median_of(
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|((x, _), (y, _))| x.rps / y.rps)
                .collect(),
        );
        let (cpu, _, _) = median_of(
            runs[a]
                .iter()
                .zip(&runs[b])
                .map(|((_, x), (_, y))| x / y)
                .collect(),
        );
        (rps, cpu)
    };
    let mut compared = vec![
        (1, 3, "keter's Nginx (metrics on) / hand-tuned Nginx"),
        (2, 3, "keter's Nginx (metrics off) / hand-tuned Nginx"),
    ];
    if before.is_some() {
        compared.push((
            targets.len() - 1,
            3,
            "KETER_BEFORE (metrics on) / hand-tuned Nginx",
        ));
        compared.push((
            1,
            targets.len() - 1,
            "this build / KETER_BEFORE (metrics on)",
        ));
    }
    for (a, b, label) in compared {
        let (rps, cpu) = paired(a, b);
        println!(
            "   {label}: {:.2} in req/s (median of the per-round ratios {rps:.2}), {:.2} in front-end CPU per request (per round {cpu:.2})",
            rows[a].0 / rows[b].0,
            rows[a].2 / rows[b].2
        );
    }
    for (target, k, ns, requests) in &keters {
        // A build that sent datagrams: Nginx warns for each one the kernel refused (the
        // socket's queue full).
        let refused = k
            .log()
            .lines()
            .filter(|l| l.contains("send() to syslog failed"))
            .count();
        println!(
            "   {}: keter's own CPU counting the requests: {:.2} ms per 1000 requests (of {requests}; datagrams refused: {refused}, net.unix.max_dgram_qlen {})",
            targets[*target].0,
            *ns as f64 / 1e6 / (*requests).max(1) as f64 * 1000.0,
            fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen")
                .unwrap_or_default()
                .trim(),
        );
    }
    // The headline ratios once more, from pairs: each target run right before or right after
    // the hand-tuned proxy, the order alternating pair by pair. On this shared machine the CPU
    // per request of one run differs from the next by about 10% (perf shows three quarters of
    // it in the kernel: loopback TCP, the same system calls per request for every target), and
    // runs further apart differ more; two runs seconds apart, many times, tell a few percent.
    let pairs: usize = std::env::args()
        .nth(3)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("overhead ROUNDS PAIRS: a number of pairs"))
        .unwrap_or(20);
    let tuned_target = 3;
    // (target, keter paused during the run): keter's Nginx with metrics on also with keter
    // stopped (SIGSTOP) while wrk runs, so that what keter's reading of the log costs the
    // front end on these shared cores shows apart from what Nginx's logging costs it; and
    // the hand-tuned proxy forwarding the headers keter's forwards, without a log.
    let mut paired_targets = vec![(1, false), (1, true), (2, false), (5, false), (7, false)];
    // With `KETER_BEFORE`, that build's Nginx with metrics on too.
    if before.is_some() {
        paired_targets.push((targets.len() - 1, false));
    }
    // keter's own CPU (ns) and the requests of the pairs' runs of each keter's Nginx with
    // metrics on, not paused: (target, keter's pid, ns, requests).
    let pids: Vec<(usize, i32)> = keters.iter().map(|(t, k, _, _)| (*t, k.pid())).collect();
    let mut counting: Vec<(usize, u64, u64)> = pids.iter().map(|(t, _)| (*t, 0, 0)).collect();
    // (wrk's result, the front end's CPU µs per request, keter's CPU ns counting it).
    let measure = |t: usize, paused: bool| -> (Wrk, f64, u64) {
        let (_, port, master) = targets[t];
        let master = master.expect("a front end");
        let stop = |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(k.pid()), sig);
        if paused {
            stop(nix::sys::signal::Signal::SIGSTOP).unwrap();
        }
        let before = workers_cpu_us(master);
        let keter = pids.iter().find(|p| p.0 == t).map(|p| p.1);
        let keter_before = keter.map_or(0, threads_cpu_ns);
        let w = wrk_result(wrk_threads(
            2,
            &format!("http://127.0.0.1:{port}/"),
            host,
            SECONDS,
            16,
            false,
        ));
        // The buffered log is written within a second: its write is this run's.
        std::thread::sleep(Duration::from_millis(1100));
        let cpu = (workers_cpu_us(master) - before) / w.requests.max(1) as f64;
        let counted = keter.map_or(0, threads_cpu_ns) - keter_before;
        if paused {
            stop(nix::sys::signal::Signal::SIGCONT).unwrap();
        }
        (w, cpu, counted)
    };
    // Per paired target: (req/s ratio, CPU per request ratio) of each pair; errors.
    let mut ratios: Vec<(Vec<f64>, Vec<f64>, u64)> = paired_targets
        .iter()
        .map(|_| (Vec::new(), Vec::new(), 0))
        .collect();
    for pair in 0..pairs {
        for (j, &(t, paused)) in paired_targets.iter().enumerate() {
            let (tuned, other) = if pair % 2 == 0 {
                let a = measure(tuned_target, false);
                (a, measure(t, paused))
            } else {
                let b = measure(t, paused);
                (measure(tuned_target, false), b)
            };
            if !paused && let Some(c) = counting.iter_mut().find(|c| c.0 == t) {
                c.1 += other.2;
                c.2 += other.0.requests;
            }
            ratios[j].0.push(other.0.rps / tuned.0.rps);
            ratios[j].1.push(other.1 / tuned.1);
            ratios[j].2 += other.0.errors + tuned.0.errors;
        }
    }
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (at(0.25), at(0.5), at(0.75))
    };
    println!(
        "\n   pairs: {pairs} pairs of {SECONDS} s runs, each target beside the hand-tuned proxy (order alternating); medians of the per-pair ratios (quartiles)"
    );
    for (j, &(t, paused)) in paired_targets.iter().enumerate() {
        let (r25, r50, r75) = quartiles(ratios[j].0.clone());
        let (c25, c50, c75) = quartiles(ratios[j].1.clone());
        let label = if paused {
            format!("{}, keter paused", targets[t].0)
        } else {
            targets[t].0.to_string()
        };
        println!(
            "   {label:<34} / hand-tuned: req/s {r50:.3} ({r25:.3}-{r75:.3}), CPU per request {c50:.3} ({c25:.3}-{c75:.3}), errors {}",
            ratios[j].2
        );
    }
    for (t, ns, requests) in &counting {
        println!(
            "   {}: keter's own CPU over the pairs' runs: {:.3} ms per 1000 requests (of {requests})",
            targets[*t].0,
            *ns as f64 / 1e6 / (*requests).max(1) as f64 * 1000.0
        );
    }
    // The proxies that log did log (an `access_log off` beside them once turned them off).
    let logged = fs::metadata(&file_log).map_or(0, |m| m.len());
    let sent = datagrams.load(std::sync::atomic::Ordering::Relaxed);
    println!("   the hand-tuned proxies' logs: {logged} bytes in the file, {sent} datagrams");
    assert!(
        logged > 0 && sent > 0,
        "a hand-tuned proxy with a log wrote none"
    );
    println!(
        "   memory per app with requests: {:.1} KiB at first, {:.1} KiB at most (traffic all day)",
        keter::requests::Requests::bytes_per_new_app() as f64 / 1024.0,
        keter::requests::Requests::bytes_per_app() as f64 / 1024.0
    );
    println!(
        "   (front µs/req: CPU time of the front end's workers per request; spread: (max - min) / median of a target's req/s)"
    );
}

/// `cargo bench --bench figures instructions` (needs valgrind: `apt-get install valgrind`):
/// the user-space instructions an Nginx worker executes per proxied request, counted by
/// callgrind, for the hand-tuned proxy, the same forwarding keter's headers, the same with
/// keter's request log line, and keter's own configuration (copied from a running keter, main
/// file included) with request metrics on and off. Unlike CPU time, the count is the same
/// from run to run whatever else the machine does; the kernel's part of a request (about three
/// quarters of its CPU here, the same system calls for every configuration) is not in it.
fn nginx_instructions() {
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok(),
        "valgrind is not installed: apt-get install valgrind"
    );
    let host = "fast.example.com";
    let on = Keter::start_with("bench-instructions", Opts::default());
    let off = Keter::start_with(
        "bench-instructions-off",
        Opts {
            extra: "request-metrics: false\n".into(),
            ..Opts::default()
        },
    );
    let app_port = deploy_fast_app(&[&on, &off]);
    let dir = TempDir::new("bench-instructions-confs");
    let log = dir.0.join("access.log");
    // (label, main configuration file, port).
    let mut confs: Vec<(&str, PathBuf, u16)> = Vec::new();
    let own = |name: &str, http: &dyn Fn(u16) -> String| {
        let port = free_port();
        let d = dir.0.join(name);
        (OwnNginx::write_conf(&d, "", &http(port)), port)
    };
    let (c, p) = own("tuned", &|port| hand_tuned_http(port, app_port, true, ""));
    confs.push(("hand-tuned Nginx", c, p));
    let (c, p) = own("forwarding", &|port| forwarding_http(port, app_port));
    confs.push(("same, forwarding keter's headers", c, p));
    let logged = |port| {
        forwarding_http(port, app_port).replace(
            "    map ",
            &format!(
                "{KETER_LOG_FORMAT}    access_log {} m buffer=64k flush=1s;\n    map ",
                log.display()
            ),
        )
    };
    let (c, p) = own("forwarding-log", &logged);
    confs.push(("same, and keter's log line", c, p));
    let (c, p) = copy_keter_nginx(&on, &dir.0.join("keter-on"));
    confs.push(("keter's Nginx, metrics on", c, p));
    let (c, p) = copy_keter_nginx(&off, &dir.0.join("keter-off"));
    confs.push(("keter's Nginx, metrics off", c, p));
    // The keters stay up: their app answers the copies.
    println!(
        "\n6. user-space instructions per proxied request of one Nginx worker (callgrind; wrk -t1 -c4, 5 s after 2 s of warm-up)"
    );
    let mut first = None;
    for (label, conf, port) in &confs {
        let n = instructions_per_request(conf, *port, host);
        let base = *first.get_or_insert(n);
        println!(
            "   {label:<36} {n:>8.0}  {:>5.3} of the hand-tuned proxy",
            n / base
        );
    }
}

/// keter's Nginx files (main, shared and the apps') copied from `k` to `dest`, every path
/// under `k`'s root moved there and its listener moved to a free port: (main file, port).
fn copy_keter_nginx(k: &Keter, dest: &Path) -> (PathBuf, u16) {
    let port = free_port();
    let from = k.root.display().to_string();
    let to = dest.display().to_string();
    fn walk(src: &Path, dst: &Path, edit: &dyn Fn(String) -> String) {
        fs::create_dir_all(dst).unwrap();
        for entry in fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            let target = dst.join(entry.file_name());
            if kind.is_dir() {
                walk(&entry.path(), &target, edit);
            } else if kind.is_file() && entry.path().extension().is_some_and(|e| e == "conf") {
                let text = fs::read_to_string(entry.path()).unwrap();
                fs::write(&target, edit(text)).unwrap();
            }
        }
    }
    let listen = format!("127.0.0.1:{}", k.port);
    let edit = |text: String| {
        text.replace(&from, &to)
            .replace(&listen, &format!("127.0.0.1:{port}"))
    };
    walk(&k.root.join("nginx"), &dest.join("nginx"), &edit);
    (dest.join("nginx/nginx.conf"), port)
}

/// Starts the Nginx of `conf` as a single process under callgrind, warms it up, counts the
/// instructions of the requests `wrk` makes in 5 s, and divides.
fn instructions_per_request(conf: &Path, port: u16, host: &str) -> f64 {
    let dir = conf.parent().unwrap();
    let out = dir.join("callgrind.out");
    let mut child = Command::new("valgrind")
        .args(["--tool=callgrind", "--instr-atstart=no"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(["nginx", "-e", "stderr", "-p"])
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .args(["-g", "daemon off; master_process off;"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("valgrind.stderr")).unwrap())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while !keter::probe::get_tcp(addr, host, "/", Duration::from_secs(5))
        .is_ok_and(|r| r.body.trim() == "fast")
    {
        assert!(
            child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60),
            "{}: nginx under valgrind does not answer: {}",
            conf.display(),
            fs::read_to_string(dir.join("valgrind.stderr")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://127.0.0.1:{port}/");
    wrk_result(wrk(&url, host, 2, 4, false));
    let control = |on: &str| {
        let ok = Command::new("callgrind_control")
            .args(["-i", on, &child.id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "callgrind_control -i {on} failed");
    };
    control("on");
    let w = wrk_result(wrk(&url, host, 5, 4, false));
    control("off");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap();
    // The totals of the dump at exit.
    let mut total: f64 = 0.0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().contains("callgrind.out") {
            continue;
        }
        for line in fs::read_to_string(&path).unwrap().lines() {
            if let Some(v) = line
                .strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
            {
                total = v.trim().parse::<f64>().unwrap_or(0.0).max(total);
            }
        }
    }
    assert!(total > 0.0, "no instructions counted in {}", out.display());
    total / w.requests.max(1) as f64
}

/// Copies `apps` bundles into `k` at once; how long until all serve.
fn burst(k: &Keter, apps: usize) -> Duration {
    let dir = k.dir.0.join("many");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..apps {
        BundleBuilder::hello(&hello_yaml(
            &format!("m{i}"),
            &format!("m{i}.example.com"),
            &[],
        ))
        .write(&dir.join(format!("m{i}.keter")));
    }
    let start = Instant::now();
    for i in 0..apps {
        let staged = k.incoming().join(format!(".m{i}.part"));
        fs::hard_link(dir.join(format!("m{i}.keter")), &staged).unwrap();
        fs::rename(&staged, k.incoming().join(format!("m{i}.keter"))).unwrap();
    }
    for i in 0..apps {
        let host = format!("m{i}.example.com");
        let want = format!("m{i}");
        loop {
            if let Ok(r) = k.get(&host, "/")
                && r.body.trim() == want
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(300), "{}", k.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    start.elapsed()
}

/// The Nginx generation of every switch in `k`'s log.
fn switch_generations(k: &Keter) -> Vec<u64> {
    k.log()
        .lines()
        .filter(|l| l.contains("switched to deploy"))
        .filter_map(|l| {
            l.split("generation ")
                .nth(1)?
                .split([' ', ','])
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// One burst into a fresh daemon: how long until all serve, the Nginx reloads and switches,
/// and the daemon's resident memory, heap and stacks, its binary's pages and threads 3 s
/// later.
struct Burst {
    all: Duration,
    reloads: usize,
    switches: usize,
    rss: u64,
    anonymous: u64,
    /// KiB of keter's own binary resident (its code and read-only data).
    binary: u64,
    threads: u64,
}

fn burst_into_fresh(label: &str, binary: Option<&PathBuf>, apps: usize, extra: &str) -> Burst {
    let k = Keter::start_with(
        label,
        Opts {
            ports: (apps * 2).max(60) as u16,
            readiness_timeout: 60.0,
            extra: extra.into(),
            binary: binary.cloned(),
            ..Opts::default()
        },
    );
    let all = burst(&k, apps);
    std::thread::sleep(Duration::from_secs(3));
    // Read after the pause: an app can answer before its switch is logged.
    let generations = switch_generations(&k);
    let mut distinct = generations.clone();
    distinct.sort();
    distinct.dedup();
    let pid = k.pid();
    if let Some(dir) = std::env::var_os("KETER_SMAPS") {
        save_memory_maps(Path::new(&dir), label, binary.is_some(), pid);
    }
    Burst {
        all,
        reloads: distinct.len(),
        switches: generations.len(),
        rss: proc_field(pid, "status", "VmRSS:"),
        anonymous: proc_field(pid, "smaps_rollup", "Anonymous:"),
        binary: binary_resident(pid),
        threads: proc_field(pid, "status", "Threads:"),
    }
}

/// `cargo bench --bench figures many` or `cargo bench --bench figures -- many APPS ROUNDS` (50 apps in 5 rounds unless told): the burst with apps as
/// users of their own and with `run-apps-as-root`, in rounds; with `KETER_BEFORE` set, the
/// same bursts into that build, interleaved round by round. Then the idle CPU of this build.
fn many_apps() {
    let apps: usize = std::env::args()
        .nth(2)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("many APPS: a number of apps"))
        .unwrap_or(50);
    let rounds: usize = std::env::args()
        .nth(3)
        .map(|a| a.parse().expect("many APPS ROUNDS: a number of rounds"))
        .unwrap_or(5);
    let before: Option<PathBuf> = std::env::var_os("KETER_BEFORE").map(PathBuf::from);
    let mut builds: Vec<(&str, Option<&PathBuf>)> = vec![("this build", None)];
    if let Some(b) = &before {
        builds.push(("KETER_BEFORE", Some(b)));
    }
    // Per build: own users, as root.
    let mut runs: Vec<(Vec<Burst>, Vec<Burst>)> =
        builds.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 0..rounds {
        for i in 0..builds.len() {
            // Each round starts with another build, so neither always runs first.
            let b = (round + i) % builds.len();
            let (_, binary) = builds[b];
            runs[b]
                .0
                .push(burst_into_fresh("bench-many", binary, apps, ""));
            runs[b].1.push(burst_into_fresh(
                "bench-many-root",
                binary,
                apps,
                "run-apps-as-root: true\n",
            ));
        }
    }
    let median_of = |v: &[Burst], f: &dyn Fn(&Burst) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        (x[x.len() / 2], x[0], x[x.len() - 1])
    };
    println!(
        "\n4. {apps} bundles copied in at once (medians of {rounds} rounds, each a fresh daemon; min-max)"
    );
    println!(
        "   {:<34} {:>20} {:>14} {:>20} {:>18} {:>12} {:>8}",
        "",
        "all serving, s",
        "reloads",
        "daemon RSS, KiB",
        "heap+stacks, KiB",
        "binary, KiB",
        "threads"
    );
    for ((label, _), (own, root)) in builds.iter().zip(&runs) {
        for (kind, v) in [("own users", own), ("run-apps-as-root", root)] {
            let all = median_of(v, &|b| b.all.as_secs_f64());
            let reloads = median_of(v, &|b| b.reloads as f64);
            let rss = median_of(v, &|b| b.rss as f64);
            let anon = median_of(v, &|b| b.anonymous as f64);
            let binary = median_of(v, &|b| b.binary as f64);
            let threads = median_of(v, &|b| b.threads as f64);
            println!(
                "   {:<34} {:>6.2} ({:.2}-{:.2}) {:>6.0} for {:>3} {:>8.0} ({:.0}-{:.0}) {:>18.0} {:>12.0} {:>8.0}",
                format!("{label}, {kind}"),
                all.0,
                all.1,
                all.2,
                reloads.0,
                v[0].switches,
                rss.0,
                rss.1,
                rss.2,
                anon.0,
                binary.0,
                threads.0
            );
        }
    }
    // Idle: a daemon of this build serving the apps uses no CPU.
    let k = Keter::start_with(
        "bench-many-idle",
        Opts {
            ports: (apps * 2).max(60) as u16,
            readiness_timeout: 60.0,
            ..Opts::default()
        },
    );
    burst(&k, apps);
    std::thread::sleep(Duration::from_secs(3));
    let pid = k.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(60));
    let cpu_ms = (cpu_ticks(pid) - before) as f64 * 10.0;
    println!("   this build, {apps} apps: CPU over 60 idle seconds {cpu_ms:.0} ms");
}

/// With `KETER_SMAPS=DIR`: the daemon's memory maps (`smaps`), its threads' names and stack
/// pointers (`task/*/stat`) and `status`, to find where its memory is.
fn save_memory_maps(dir: &Path, label: &str, before: bool, pid: i32) {
    let build = if before { "before" } else { "this" };
    let n = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let to = dir.join(format!("{n:03}-{label}-{build}"));
    fs::create_dir_all(&to).unwrap();
    for file in ["smaps", "smaps_rollup", "status", "maps"] {
        let _ = fs::copy(format!("/proc/{pid}/{file}"), to.join(file));
    }
    let mut threads = String::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        threads.push_str(&stat);
    }
    fs::write(to.join("threads"), threads).unwrap();
}

/// KiB of the daemon's own binary in its resident memory: the pages of its code and
/// read-only data that the kernel mapped (those touched and their neighbours), which follow
/// the binary's size.
fn binary_resident(pid: i32) -> u64 {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe.to_string_lossy();
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, permissions, offset, device, inode, path.
            ours = line.split_whitespace().nth(5) == Some(&*exe);
        } else if ours && let Some(v) = line.strip_prefix("Rss:") {
            kib += v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

/// The first number after `field` in `/proc/PID/FILE` (KiB for the memory fields).
fn proc_field(pid: i32, file: &str, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process in clock ticks (10 ms each on Linux).
/// The CPU time of every thread of process `pid` in nanoseconds (its threads' `schedstat`,
/// precise where `stat`'s ticks are 10 ms).
fn threads_cpu_ns(pid: i32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A bundle of the example app with a static-files stanza of `files` files in 10 folders:
/// the app's folder is handed over and its static root opened to Nginx's workers.
fn static_bundle(path: &Path, version: &str, host: &str, files: usize) {
    let mut b = BundleBuilder::hello(&format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    host: {host}\n  - type: static-files\n    root: ../static\n    hosts: [static.{host}]\n"
    ));
    for i in 0..files {
        b = b.file(
            &format!("static/d{}/f{i}.css", i % 10),
            format!("/* {i} */\n").into_bytes(),
            0o644,
        );
    }
    b.write(path);
}

/// Renames `bundle` in as `name` and waits until `host` answers `version`; the time taken.
fn deploy_and_wait(k: &Keter, name: &str, bundle: &Path, host: &str, version: &str) -> Duration {
    let staged = k.incoming().join(format!(".{name}.part"));
    fs::copy(bundle, &staged).unwrap();
    let start = Instant::now();
    fs::rename(&staged, k.incoming().join(format!("{name}.keter"))).unwrap();
    loop {
        if let Ok(r) = k.get(host, "/")
            && r.body.trim() == version
        {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{}", k.log());
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// "N ms after the bundle was picked up" of the last switch of `app` in keter's log.
fn picked_up_to_switch(k: &Keter, app: &str) -> Duration {
    let needle = format!("{app}: switched to deploy");
    let line = k
        .log()
        .lines()
        .rfind(|l| l.contains(&needle))
        .map(str::to_string);
    let ms = line
        .as_deref()
        .and_then(|l| l.rsplit(" ms after the bundle").nth(1))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no switch of {app} in the log"));
    Duration::from_millis(ms)
}

/// The microseconds of every `isolation:` debug line of keter's log from line `from` on.
fn isolation_us(k: &Keter, from: usize) -> (u64, usize) {
    let log = k.log();
    let lines: Vec<&str> = log.lines().collect();
    let us = lines[from.min(lines.len())..]
        .iter()
        .filter(|l| l.contains(" isolation: "))
        .filter_map(|l| {
            l.strip_suffix(" us")?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (us, lines.len())
}

fn isolation_cost() {
    const RUNS: usize = 15;
    const FILES: usize = 500;
    // The isolation's own steps are logged at debug level with their durations.
    // SAFETY: no other thread runs yet.
    unsafe { std::env::set_var("KETER_TEST_LOG", "debug") };
    let opts = |extra: &str| Opts {
        drain_time: 1.0,
        ports: 80,
        extra: extra.into(),
        ..Opts::default()
    };
    let isolated = Keter::start_with("bench-isolated", opts(""));
    let as_root = Keter::start_with("bench-as-root", opts("run-apps-as-root: true\n"));
    let before = std::env::var_os("KETER_BEFORE").map(|bin| {
        Keter::start_with(
            "bench-before",
            Opts {
                binary: Some(bin.into()),
                ..opts("")
            },
        )
    });
    let mut kinds = vec![(&isolated, "own users"), (&as_root, "as root")];
    if let Some(b) = &before {
        kinds.push((b, "own users, KETER_BEFORE"));
    }
    let n = kinds.len();
    // Redeploys of one app, interleaved between the daemons.
    let mut redeploy = vec![Vec::new(); n];
    let mut switch = vec![Vec::new(); n];
    let mut own_steps = vec![Vec::new(); n];
    let mut seen = vec![0; n];
    for i in 0..=RUNS {
        for (n, (k, _)) in kinds.iter().enumerate() {
            let version = format!("v{i}");
            let path = k.dir.0.join(format!("r{i}.keter"));
            static_bundle(&path, &version, "iso.example.com", FILES);
            let took = deploy_and_wait(k, "iso", &path, "iso.example.com", &version);
            std::thread::sleep(Duration::from_millis(1200));
            let (us, lines) = isolation_us(k, seen[n]);
            seen[n] = lines;
            if i > 0 {
                redeploy[n].push(took);
                switch[n].push(picked_up_to_switch(k, "iso"));
                own_steps[n].push(Duration::from_micros(us));
            }
        }
    }
    // First deploys of new apps: the user is created on the way.
    let mut first = vec![Vec::new(); n];
    let mut first_steps = vec![Vec::new(); n];
    for i in 0..RUNS {
        for (n, (k, _)) in kinds.iter().enumerate() {
            let name = format!("new{i}");
            let host = format!("{name}.example.com");
            let path = k.dir.0.join(format!("{name}.keter"));
            static_bundle(&path, &name, &host, FILES);
            first[n].push(deploy_and_wait(k, &name, &path, &host, &name));
            std::thread::sleep(Duration::from_millis(300));
            let (us, lines) = isolation_us(k, seen[n]);
            seen[n] = lines;
            first_steps[n].push(Duration::from_micros(us));
        }
    }
    println!(
        "\n5. what isolation costs a deploy (medians of {RUNS}, interleaved; the example app with a static root of {FILES} files)"
    );
    println!(
        "   {:>24} {:>16} {:>16} {:>18} {:>16} {:>18}",
        "apps run", "redeploy", "picked up->", "isolation steps", "first deploy", "isolation steps"
    );
    println!(
        "   {:>24} {:>16} {:>16} {:>18} {:>16} {:>18}",
        "", "rename->answer", "switch", "per redeploy", "rename->answer", "first deploy"
    );
    let mut medians = Vec::new();
    for (n, (_, label)) in kinds.iter().enumerate() {
        let row = (
            median(&mut redeploy[n]),
            median(&mut switch[n]),
            median(&mut own_steps[n]),
            median(&mut first[n]),
            median(&mut first_steps[n]),
        );
        println!(
            "   {label:>24} {:>13.1} ms {:>13.1} ms {:>15.2} ms {:>13.1} ms {:>15.2} ms",
            ms(row.0),
            ms(row.1),
            ms(row.2),
            ms(row.3),
            ms(row.4)
        );
        medians.push(row);
    }
    let d = |a: Duration, b: Duration| ms(a) - ms(b);
    println!(
        "   own users against as root: {:+.1} ms per redeploy end to end ({:+.1} ms picked up to switch), {:+.1} ms per first deploy",
        d(medians[0].0, medians[1].0),
        d(medians[0].1, medians[1].1),
        d(medians[0].3, medians[1].3)
    );
    if n > 2 {
        println!(
            "   this build against KETER_BEFORE: {:+.1} ms per redeploy end to end ({:+.2} ms of isolation steps), {:+.1} ms per first deploy ({:+.2} ms of isolation steps)",
            d(medians[0].0, medians[2].0),
            d(medians[0].2, medians[2].2),
            d(medians[0].3, medians[2].3),
            d(medians[0].4, medians[2].4)
        );
    }
    println!(
        "   (isolation steps: keter's own timing of the app's user, the hand-over of its folder and the opening and check of its static roots, from its debug log)"
    );
}

/// What Nginx's check of symlinks in static roots costs (README, "How Nginx reads static
/// files"): a small static file of an app's bundle, served by keter's Nginx as keter writes
/// it, and beside it by one Nginx (workers as www-data, as keter's) from the same folder in
/// three ways that differ only in `disable_symlinks`: not at all, `if_not_owner` from the
/// app's folder on (what keter writes), and `if_not_owner` on every component of the path;
/// and the check from the app's folder with Nginx's cache of open files, which keter does not
/// write. `wrk -t1 -c32` keep-alive against the five in turn, rounds of 2 s, medians.
fn symlink_check_cost() {
    const ROUNDS: usize = 9;
    const SECONDS: u64 = 2;
    let k = Keter::start_with("bench-symlinks", Opts::default());
    let host = "files.example.com";
    let path = k.dir.0.join("files.keter");
    BundleBuilder::new()
        .file(
            "config/keter.yaml",
            format!("stanzas:\n  - type: static-files\n    root: ../static\n    hosts: [{host}]\n")
                .into_bytes(),
            0o644,
        )
        .file("static/small.txt", b"a small file\n".to_vec(), 0o644)
        .write(&path);
    k.deploy("files", &path);
    let start = Instant::now();
    while k.get(host, "/small.txt").map(|r| r.status).ok() != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let conf = fs::read_to_string(k.root.join("nginx/apps/files.conf")).unwrap();
    // The static root, not the ACME webroot's location.
    let root = conf
        .lines()
        .filter_map(|l| l.strip_prefix("    root "))
        .map(|r| r.trim_end_matches(';').to_string())
        .find(|r| r.contains("/temp/files-"))
        .unwrap();
    let from = Path::new(&root).parent().unwrap().display().to_string();
    assert!(
        conf.contains(&format!("disable_symlinks if_not_owner from={from};")),
        "{conf}"
    );
    let components = Path::new(&root).join("small.txt").components().count() - 1;
    let variants = [
        ("no check", String::new()),
        (
            "if_not_owner from the app's folder",
            format!("disable_symlinks if_not_owner from={from}; "),
        ),
        (
            "if_not_owner, every component",
            "disable_symlinks if_not_owner; ".to_string(),
        ),
        // Tried, not written by keter: a file an app replaces would be served as it was for
        // up to a second.
        (
            "from the app's folder, open_file_cache",
            format!(
                "disable_symlinks if_not_owner from={from}; open_file_cache max=1000 inactive=20s; open_file_cache_valid 1s; "
            ),
        ),
    ];
    let ports: Vec<u16> = variants.iter().map(|_| free_port()).collect();
    let mut http = String::new();
    for ((_, directive), port) in variants.iter().zip(&ports) {
        http.push_str(&format!(
            "    server {{\n        listen 127.0.0.1:{port};\n        sendfile on; tcp_nopush on; keepalive_timeout 65;\n        root {root};\n        location / {{ {directive}try_files $uri $uri/ =404; autoindex off; expires 1h; }}\n    }}\n"
        ));
    }
    let own = OwnNginx::start(
        "bench-symlinks-nginx",
        "user www-data;\n",
        &http,
        ports[0],
        host,
        "/small.txt",
        "a small file",
    );
    // (label, port, master).
    let mut targets = vec![("keter's Nginx, as keter writes it", k.port, k.nginx_pid())];
    for ((label, _), port) in variants.iter().zip(&ports) {
        targets.push((label, *port, own.child.id() as i32));
    }
    for (label, port, _) in &targets {
        let r = keter::probe::get_tcp(
            std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
            host,
            "/small.txt",
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{label}");
    }
    // Round-robin, each round starting one target further (as the overhead bench does).
    let mut runs: Vec<Vec<(Wrk, f64)>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for i in 0..targets.len() {
            let t = (round + i) % targets.len();
            let (_, port, master) = targets[t];
            let before = workers_cpu_us(master);
            let w = wrk_result(wrk(
                &format!("http://127.0.0.1:{port}/small.txt"),
                host,
                SECONDS,
                32,
                false,
            ));
            // The front Nginx serves every variant; its CPU per request is read per run.
            let per_request = (workers_cpu_us(master) - before) / w.requests.max(1) as f64;
            runs[t].push((w, per_request));
        }
    }
    let median_of = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let rows: Vec<(f64, f64, f64, u64)> = runs
        .iter()
        .map(|r| {
            (
                median_of(r.iter().map(|(w, _)| w.rps).collect()),
                median_of(r.iter().map(|(w, _)| w.p99_ms).collect()),
                median_of(r.iter().map(|(_, c)| *c).collect()),
                r.iter().map(|(w, _)| w.errors).sum(),
            )
        })
        .collect();
    println!(
        "\n6. symlink check of static files ({} bytes, {components} path components; keep-alive, 32 connections; {ROUNDS} rounds of {SECONDS} s over the {} targets in turn, medians)",
        b"a small file\n".len(),
        targets.len()
    );
    println!(
        "   {:<40} {:>10} {:>10} {:>11} {:>11} {:>8}",
        "", "req/s", "p99 ms", "of no check", "µs CPU/req", "errors"
    );
    for ((label, _, _), (rps, p99, cpu, errors)) in targets.iter().zip(&rows) {
        println!(
            "   {:<40} {:>10.0} {:>10.2} {:>11.2} {:>11.1} {:>8}",
            label,
            rps,
            p99,
            rps / rows[1].0,
            cpu,
            errors
        );
    }
    // Per round, the check from the app's folder against no check: measured seconds apart.
    let mut paired: Vec<f64> = runs[2]
        .iter()
        .zip(&runs[1])
        .map(|((with, _), (without, _))| with.rps / without.rps)
        .collect();
    paired.sort_by(|a, b| a.total_cmp(b));
    println!(
        "   if_not_owner from the app's folder / no check, per round: median {:.3}, from {:.3} to {:.3}",
        paired[paired.len() / 2],
        paired[0],
        paired[paired.len() - 1]
    );
}

/// `cargo bench --bench figures counting`: what keter's request log thread spends per line,
/// parsing and counting a realistic log held in memory (no Nginx, no file): nanoseconds per
/// line, the median of 15 passes. In keter the lines were just written by Nginx's workers on
/// the other core, so the thread spends more per line than here (see the overhead figure's
/// "keter's own CPU").
fn counting_cost() {
    use keter::requests::{Line, Requests};
    let lines = sample_request_log(200_000);
    let now = 1_765_000_000 + 3600;
    let mut parse = Vec::new();
    let mut count = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let mut n = 0u64;
        for l in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            n += u64::from(Line::parse(l).is_some());
        }
        parse.push(t.elapsed());
        assert_eq!(n, 200_000);
        let requests = Requests::default();
        let t = Instant::now();
        // As the log's thread reads the file, a chunk of 256 KiB at a time.
        for chunk in lines.chunks(256 << 10) {
            requests.count_lines(chunk, now);
        }
        count.push(t.elapsed());
    }
    let per_line = |v: &mut Vec<Duration>| median(v).as_nanos() as f64 / 200_000.0;
    println!("\n7. counting the request log (200,000 lines in memory, medians of 15 passes)");
    println!(
        "   parsing each line alone (Line::parse): {:.0} ns per line",
        per_line(&mut parse)
    );
    println!(
        "   parsing and counting as the log's thread does (Requests::count_lines, 256 KiB at a time): {:.0} ns per line",
        per_line(&mut count)
    );
}

/// `n` lines of keter's request log as Nginx writes them at about 40,000 requests a second:
/// mostly one app, a second one now and then, mostly 200s with a few 404s and 502s.
fn sample_request_log(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let start = 1_765_000_000u64;
    for i in 0..n {
        let time = keter::requests::line::iso8601_utc(start + (i / 40_000) as u64);
        let (app, release) = if i % 10 == 3 {
            ("blog", 7)
        } else {
            ("shop-api", 12)
        };
        let (status, bytes, up, header) = match i % 50 {
            7 => (404, 312, "0.002", "0.002"),
            9 => (502, 552, "0.000", "-"),
            _ => (200, 4_807, "0.001", "0.001"),
        };
        out.extend_from_slice(
            format!("k3|{app}|{release}|{time}|{status}|{bytes}|{up}|{header}\n").as_bytes(),
        );
    }
    out
}
