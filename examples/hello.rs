//! A small web app for keter's tests and demo. It listens on `127.0.0.1:$PORT` and answers
//! `GET /` with its version string. Flags make it misbehave on purpose:
//!
//! ```text
//! hello [--version-string V] [--delay-ms N] [--crash] [--never-listen] [--status N]
//!       [--ignore-term] [--spawn-child] [--crash-after-first-run] [--home-kb N]
//!       [--keep-open] [--log-requests] [--wait-for-port] [--hang-after N] [--setsid-child]
//!       [--allocate-mb N] [--fork-bomb] [--exit-after-ms N] [--fail-percent P]
//! ```
//!
//! `--exit-after-ms N` exits with code 5 N milliseconds after it starts, every time: a release
//! that crash-loops a few seconds after its switch. `--fail-percent P` answers 500 to P of
//! every 100 requests (spread evenly), except those for `/health`: a release that fails its
//! users while its health check passes.
//!
//! `--hang-after N` answers N requests, then accepts connections and reads requests but never
//! answers again, as a Warp app whose database pool is exhausted does; only on its first start
//! in its folder (it leaves a marker file there): a fresh process that keter starts in its
//! place serves.
//!
//! `--setsid-child` starts a grandchild `sleep 3600.PID` (PID its own pid) in a session of its
//! own, out of the app's process group: only its control group holds it. `--allocate-mb N`
//! takes and touches N MiB before anything else, as a leaking app does. `--fork-bomb` starts
//! `sleep` children on a thread of its own for as long as it can (up to 100000), printing
//! `fork bomb: N children` when a start first fails.
//!
//! `--home-kb N` makes `/` a home page of N KiB sent in chunks, as Warp streams a Yesod page;
//! `--keep-open` keeps every connection open after an answer, even when the client asked to
//! close it. `--log-requests` prints a line `request TARGET` for every request before
//! answering it, as a chatty framework logs.
//!
//! `--wait-for-port` tries to bind its port again and again, without pausing, until it gets it:
//! a program that takes a neighbour's port the moment the neighbour lets go of it (the tests
//! run it with another app's uid against a webapp they kill).
//!
//! `--crash-after-first-run` serves on its first start and exits at once on every later one
//! (it leaves a marker file in its working folder): a crash loop after a good deploy.
//!
//! Paths: `/` version, `/env` its environment, `/pid` its pid, `/whoami` its uid, gid and
//! groups, `/slow?ms=N` answers after N milliseconds, `/status?code=N` answers with status N, `/exit` exits with code 7,
//! `/print?n=N` prints N lines of 100 bytes, `/write?path=P` tries to create file P and
//! answers `ok` or the error, `/read?path=P` tries to read file P and answers `ok` or the
//! error, `/symlink?target=T&link=L` makes L a symlink to T (a folder at L is renamed to
//! `L.replaced` first, anything else there removed) and answers `ok` or the error, as an app
//! that plants links in its static root does, `/upload` the number of body bytes it
//! received, `/method` the request's method (also in every answer's `X-Request-Method`),
//! `/host` the `Host` header it got. A request with `Upgrade:
//! websocket` gets `101 Switching Protocols`, then every chunk it sends is echoed back
//! prefixed with the version (enough to test that Nginx keeps such a tunnel open).
//! HTTP/1.1 keep-alive is supported so Nginx can reuse upstream connections.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

struct Options {
    version: String,
    delay_ms: u64,
    crash: bool,
    never_listen: bool,
    status: u16,
    ignore_term: bool,
    spawn_child: bool,
    crash_after_first_run: bool,
    home_kb: usize,
    keep_open: bool,
    log_requests: bool,
    wait_for_port: bool,
    hang_after: Option<u64>,
    setsid_child: bool,
    allocate_mb: usize,
    fork_bomb: bool,
    exit_after_ms: Option<u64>,
    fail_percent: u64,
}

/// `--fail-percent P`, and the requests counted so far.
static FAIL: std::sync::OnceLock<(u64, std::sync::atomic::AtomicU64)> = std::sync::OnceLock::new();

/// True when this request is one of the P in 100 that `--fail-percent P` fails.
fn fails(target: &str) -> bool {
    let Some((p, n)) = FAIL.get() else {
        return false;
    };
    if *p == 0 || target == "/health" {
        return false;
    }
    let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (n + 1) * p / 100 != n * p / 100
}

fn options() -> Options {
    let mut o = Options {
        version: std::env::var("HELLO_VERSION").unwrap_or_else(|_| "hello".into()),
        delay_ms: 0,
        crash: false,
        never_listen: false,
        status: 200,
        ignore_term: false,
        spawn_child: false,
        crash_after_first_run: false,
        home_kb: 0,
        keep_open: false,
        log_requests: false,
        wait_for_port: false,
        hang_after: None,
        setsid_child: false,
        allocate_mb: 0,
        fork_bomb: false,
        exit_after_ms: None,
        fail_percent: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--version-string" => o.version = args.next().expect("--version-string V"),
            "--delay-ms" => {
                o.delay_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--delay-ms N")
            }
            "--crash" => o.crash = true,
            "--never-listen" => o.never_listen = true,
            "--status" => {
                o.status = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--status N")
            }
            "--ignore-term" => o.ignore_term = true,
            "--spawn-child" => o.spawn_child = true,
            "--crash-after-first-run" => o.crash_after_first_run = true,
            "--home-kb" => {
                o.home_kb = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--home-kb N")
            }
            "--keep-open" => o.keep_open = true,
            "--log-requests" => o.log_requests = true,
            "--wait-for-port" => o.wait_for_port = true,
            "--hang-after" => {
                o.hang_after = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--hang-after N"),
                )
            }
            "--setsid-child" => o.setsid_child = true,
            "--allocate-mb" => {
                o.allocate_mb = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--allocate-mb N")
            }
            "--fork-bomb" => o.fork_bomb = true,
            "--exit-after-ms" => {
                o.exit_after_ms = Some(
                    args.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--exit-after-ms N"),
                )
            }
            "--fail-percent" => {
                o.fail_percent = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|p| *p <= 100)
                    .expect("--fail-percent P (0 to 100)")
            }
            other => eprintln!("hello: ignoring unknown argument {other}"),
        }
    }
    o
}

// The C library's signal(2), declared here rather than taken from the libc crate: this file
// uses the standard library alone, so that scripts/demo builds it with rustc without the
// dependencies cargo builds for anything in examples/. Linux's numbers.
unsafe extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}
const SIGTERM: i32 = 15;
const SIG_IGN: usize = 1;

fn main() {
    let mut o = options();
    println!("hello {}: starting, pid {}", o.version, std::process::id());
    if o.ignore_term {
        // SAFETY: installing SIG_IGN has no handler code to run.
        unsafe { signal(SIGTERM, SIG_IGN) };
    }
    if o.spawn_child {
        // A grandchild that keeps running unless its process group is stopped.
        let _ = std::process::Command::new("sleep").arg("3600").spawn();
    }
    if o.setsid_child {
        // setsid(1) calls setsid() itself in a child that leads no group, then runs sleep.
        let _ = std::process::Command::new("setsid")
            .arg("sleep")
            .arg(format!("3600.{}", std::process::id()))
            .spawn();
    }
    if o.allocate_mb > 0 {
        println!("hello {}: allocating {} MiB", o.version, o.allocate_mb);
        let mut held: Vec<Vec<u8>> = Vec::new();
        for _ in 0..o.allocate_mb {
            // Touched, so that the pages are really taken.
            held.push(vec![1u8; 1 << 20]);
        }
        println!("hello {}: holding {} MiB", o.version, held.len());
        std::mem::forget(held);
    }
    if o.fork_bomb {
        let version = o.version.clone();
        std::thread::spawn(move || {
            let mut children = 0u32;
            let mut said = false;
            while children < 100_000 {
                match std::process::Command::new("sleep").arg("3600").spawn() {
                    Ok(_) => children += 1,
                    Err(e) => {
                        if !said {
                            println!("hello {version}: fork bomb: {children} children ({e})");
                            said = true;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
    }
    if o.crash_after_first_run {
        let marker = std::path::Path::new("hello-ran-once");
        if marker.exists() {
            eprintln!("hello {}: crashing on a restart, on purpose", o.version);
            std::process::exit(4);
        }
        std::fs::write(marker, "").expect("write the marker file");
    }
    if o.hang_after.is_some() {
        let marker = std::path::Path::new("hello-hung-once");
        if marker.exists() {
            o.hang_after = None;
        } else {
            std::fs::write(marker, "").expect("write the marker file");
        }
    }
    if let Some(ms) = o.exit_after_ms {
        let version = o.version.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("hello {version}: exiting {ms} ms after its start, on purpose");
            std::process::exit(5);
        });
    }
    FAIL.get_or_init(|| (o.fail_percent, std::sync::atomic::AtomicU64::new(0)));
    if o.crash {
        eprintln!("hello {}: crashing on purpose", o.version);
        std::process::exit(3);
    }
    std::thread::sleep(Duration::from_millis(o.delay_ms));
    if o.never_listen {
        println!("hello {}: never listening", o.version);
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT must be set");
    let listener = loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => break l,
            Err(e) if o.wait_for_port && e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("bind: {e}"),
        }
    };
    println!("hello {}: listening on port {port}", o.version);
    let version = o.version.clone();
    let status = o.status;
    let (home_kb, keep_open, log_requests) = (o.home_kb, o.keep_open, o.log_requests);
    let hang = HANG.get_or_init(|| (o.hang_after, std::sync::atomic::AtomicU64::new(0)));
    if let Some(n) = hang.0 {
        println!("hello {}: hanging after {n} requests", o.version);
    }
    for stream in listener.incoming().flatten() {
        let version = version.clone();
        std::thread::spawn(move || {
            serve(stream, &version, status, home_kb, keep_open, log_requests)
        });
    }
}

/// `--hang-after N`, and the requests answered so far.
static HANG: std::sync::OnceLock<(Option<u64>, std::sync::atomic::AtomicU64)> =
    std::sync::OnceLock::new();

/// True once `--hang-after N` requests were answered: this one is never answered.
fn hung() -> bool {
    let Some((Some(n), count)) = HANG.get() else {
        return false;
    };
    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= *n
}

fn serve(
    stream: TcpStream,
    version: &str,
    status: u16,
    home_kb: usize,
    keep_open: bool,
    log_requests: bool,
) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = request_line.ends_with("HTTP/1.0\r\n") && !keep_open;
        let mut content_length = 0usize;
        let mut host = String::new();
        let mut upgrade = false;
        // What the front end says about the client, for `/forwarded`.
        let mut forwarded: Vec<String> = Vec::new();
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = header.trim_end().to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if h == "connection: close" && !keep_open {
                close = true;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = h.strip_prefix("host:") {
                host = v.trim().to_string();
            }
            if h == "upgrade: websocket" {
                upgrade = true;
            }
            if h.starts_with("x-forwarded-") || h.starts_with("x-real-ip:") {
                forwarded.push(h.clone());
            }
        }
        if upgrade {
            let _ = out.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            let mut buf = [0u8; 4096];
            loop {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let reply = format!("{version}:{}", String::from_utf8_lossy(&buf[..n]));
                        if out.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if content_length > 0 {
            let mut body = vec![0u8; content_length];
            if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
                return;
            }
        }
        let method = request_line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        if log_requests {
            println!("request {target}");
        }
        if hung() {
            // Accepted and read, never answered: the connection stays open until the client
            // or the process goes.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if target == "/" && home_kb > 0 {
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n{}\r\n",
                if close { "Connection: close\r\n" } else { "" }
            );
            let chunk = format!("400\r\n{}\r\n", "y".repeat(1024));
            let mut page = head.into_bytes();
            for _ in 0..home_kb {
                page.extend(chunk.as_bytes());
            }
            page.extend(b"0\r\n\r\n");
            if out.write_all(&page).is_err() || close {
                return;
            }
            continue;
        }
        let mut answer = if fails(&target) { 500 } else { status };
        let body = if target == "/env" {
            let mut vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
            vars.sort();
            vars.join("\n") + "\n"
        } else if target == "/host" {
            format!("{host}\n")
        } else if target == "/forwarded" {
            forwarded.sort();
            forwarded.join("\n") + "\n"
        } else if target == "/upload" {
            format!("received {content_length}\n")
        } else if target == "/method" {
            format!("{method}\n")
        } else if let Some(path) = target.strip_prefix("/read?path=") {
            match std::fs::read(path) {
                Ok(_) => "ok\n".to_string(),
                Err(e) => format!("error: {e}\n"),
            }
        } else if target == "/fds" {
            // Every descriptor beyond stdin, stdout and stderr, with what it refers to.
            let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| {
                            let n: u32 = e.file_name().to_str()?.parse().ok()?;
                            let to = std::fs::read_link(e.path()).ok()?;
                            (n > 2).then(|| format!("{n} {}", to.display()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            fds.sort();
            fds.join("\n") + "\n"
        } else if target == "/pid" {
            format!("{}\n", std::process::id())
        } else if target == "/whoami" {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .filter(|l| {
                    l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:")
                })
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
                .collect()
        } else if target == "/exit" {
            eprintln!("hello {version}: exiting on request");
            std::process::exit(7);
        } else if let Some(n) = target.strip_prefix("/print?n=") {
            let n: usize = n.parse().unwrap_or(0);
            for i in 0..n {
                println!("{i:06} {}", "x".repeat(93));
            }
            format!("printed {n}\n")
        } else if let Some(query) = target.strip_prefix("/symlink?") {
            match symlink(query) {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("error: {e}\n"),
            }
        } else if let Some(path) = target.strip_prefix("/write?path=") {
            match std::fs::write(path, "written by hello\n") {
                Ok(()) => "ok\n".to_string(),
                Err(e) => format!("error: {e}\n"),
            }
        } else if let Some(ms) = target.strip_prefix("/slow?ms=") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
            format!("{version}\n")
        } else if let Some(code) = target.strip_prefix("/status?code=") {
            answer = code.parse().unwrap_or(status);
            format!("{version}\n")
        } else {
            format!("{version}\n")
        };
        let response = format!(
            "HTTP/1.1 {answer} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Request-Method: {method}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if out.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// `/symlink?target=T&link=L`: makes `L` a symlink to `T`, replacing what is at `L` (a folder
/// is moved aside to `L.replaced`, so that the app can swap a whole folder for a link).
fn symlink(query: &str) -> std::io::Result<()> {
    let field = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| std::io::Error::other(format!("{name}= is missing")))
    };
    let (to, link) = (field("target")?, field("link")?);
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.is_dir() => std::fs::rename(link, format!("{link}.replaced"))?,
        Ok(_) => std::fs::remove_file(link)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(to, link)
}
