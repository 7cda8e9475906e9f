//! A hostile app for keter's tests: deployed like any webapp, it tries every access that one
//! app must not have to a neighbour app and to keter's own state, and reports what it reached.
//! The integration tests and the package test (`scripts/test-package`) read its report.
//!
//! ```text
//! probe [--version-string V]
//! ```
//!
//! It listens on `127.0.0.1:$PORT`. `GET /` answers its version string. `GET /report?neighbour=NAME`
//! runs every check against the app `NAME` and keter's root (the folder two levels above its own
//! working folder `ROOT/temp/SELF-N`, or `&root=PATH`), and answers a `text/plain` report:
//!
//! ```text
//! probe uid=65600 gid=65600 groups=65600 root=/opt/keter neighbour=appb
//! found appb folders: temp/appb-2
//! found appb pids: 4242
//! reached list temp/: no -- Permission denied (os error 13)
//! reached read temp/appb-N: no -- Permission denied (os error 13)
//! ...
//! summary: reached 0 of 28
//! ```
//!
//! The format, which scripts rely on:
//! * every check is one line `reached CHECK: yes` or `reached CHECK: no`, optionally followed by
//!   ` -- ` and what happened (the error, or what was read). `CHECK` names never change; the
//!   list is [`CHECKS`] below. A shell asserts a check with
//!   `grep -q '^reached read etc/processes: no'`, and that nothing was reached with
//!   `! grep -q '^reached .*: yes'`.
//! * `found NAME folders:` and `found NAME pids:` say what the probe could learn about its
//!   neighbour without reaching it (folder names by `stat`, processes from `/proc`), so that a
//!   test can tell "not reached" from "not found"; `-` when nothing was found.
//! * the last line is `summary: reached N of M`.
//!
//! Query parameters: `neighbour` (required), `root`, and `status`: where keter's status
//! interface listens, `HOST:PORT` or `unix:PATH` (default `127.0.0.1:4080`). Nothing is
//! changed: files written to test access are removed at once, and signals are signal 0, which
//! only checks the permission.
//!
//! `GET /hold?addr=HOST:PORT&n=N` attacks a listener instead: it opens N TCP connections to
//! `addr`, sends nothing on them and keeps them open as long as the probe runs (raising its own
//! soft limit of open files to the hard one first), then answers `held N connections to
//! HOST:PORT` or the error that stopped it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every check, in report order. Scripts match these names.
pub const CHECKS: &[&str] = &[
    "list temp/",
    "read temp/NEIGHBOUR-N",
    "write temp/NEIGHBOUR-N",
    "write temp/",
    "list log/",
    "read log/app-NEIGHBOUR.log",
    "write log/",
    "list etc/",
    "read etc/processes",
    "read etc/postgres.yaml",
    "read etc/certs/NEIGHBOUR-N",
    "list incoming/",
    "read incoming/NEIGHBOUR.keter",
    "write incoming/",
    "list nginx/apps/",
    "read nginx/apps/NEIGHBOUR.conf",
    "write nginx/",
    "write nginx/apps/",
    "read nginx/worker-files/requests.log",
    "append nginx/worker-files/requests.log",
    "write acme/",
    "list home/",
    "read home/NEIGHBOUR",
    "signal NEIGHBOUR",
    "read NEIGHBOUR environment",
    "read NEIGHBOUR memory map",
    "status interface",
    "read NEIGHBOUR output through the status interface",
];

/// Folder numbers tried when `temp/` cannot be listed: keter numbers its unpack folders from 1
/// within one run.
const MAX_FOLDER_NUMBER: u32 = 5000;

fn main() {
    let mut version = "probe".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--version-string" {
            version = args.next().expect("--version-string V");
        }
    }
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT must be set");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    println!("probe {version}: listening on port {port}");
    for stream in listener.incoming().flatten() {
        let version = version.clone();
        std::thread::spawn(move || serve(stream, &version));
    }
}

fn serve(stream: TcpStream, version: &str) {
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) if header.trim_end().is_empty() => break,
                Ok(_) => {
                    if header.trim_end().eq_ignore_ascii_case("connection: close") {
                        close = true;
                    }
                }
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let (status, body) = match path {
            "/report" => match param(query, "neighbour") {
                Some(neighbour) => (200, report(&neighbour, query)),
                None => (400, "the report needs ?neighbour=NAME\n".to_string()),
            },
            "/hold" => match (param(query, "addr"), param(query, "n")) {
                (Some(addr), Some(n)) => match n.parse() {
                    Ok(n) => hold(&addr, n),
                    Err(_) => (400, "n must be a number\n".to_string()),
                },
                _ => (400, "hold needs ?addr=HOST:PORT&n=N\n".to_string()),
            },
            _ => (200, format!("{version}\n")),
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if out.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Opens `n` connections to `addr` that never send anything, and keeps them.
fn hold(addr: &str, n: usize) -> (u16, String) {
    static HELD: std::sync::Mutex<Vec<TcpStream>> = std::sync::Mutex::new(Vec::new());
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let Ok(target) = addr.parse() else {
        return (400, format!("{addr} is not HOST:PORT\n"));
    };
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..n {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(e) => {
                return (
                    500,
                    format!("opened {i} connections to {addr}, then: {e}\n"),
                );
            }
        }
    }
    (200, format!("held {n} connections to {addr}\n"))
}

/// The value of `name` in a query string, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one check got: `Ok` with what was reached, or `Err` with why not.
type Outcome = Result<String, String>;

struct Probe {
    root: PathBuf,
    neighbour: String,
    status: String,
    /// The neighbour's unpacked folders (`temp/NAME-N`), as far as the probe can tell.
    folders: Vec<PathBuf>,
    /// The neighbour's processes.
    pids: Vec<i32>,
}

fn report(neighbour: &str, query: &str) -> String {
    let root = param(query, "root").map(PathBuf::from).unwrap_or_else(|| {
        let cwd = std::env::current_dir().unwrap_or_default();
        cwd.parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    });
    let mut p = Probe {
        status: param(query, "status").unwrap_or_else(|| "127.0.0.1:4080".into()),
        folders: Vec::new(),
        pids: Vec::new(),
        neighbour: neighbour.to_string(),
        root,
    };
    p.folders = p.find_folders();
    p.pids = p.find_pids();
    let mut out = format!(
        "probe {} root={} neighbour={neighbour}\n",
        identity(),
        p.root.display()
    );
    let show = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(" ")
        }
    };
    out += &format!(
        "found {neighbour} folders: {}\n",
        show(
            p.folders
                .iter()
                .map(|f| f.strip_prefix(&p.root).unwrap_or(f).display().to_string())
                .collect()
        )
    );
    out += &format!(
        "found {neighbour} pids: {}\n",
        show(p.pids.iter().map(|p| p.to_string()).collect())
    );
    let mut reached = 0;
    for check in CHECKS {
        let outcome = p.run(check);
        let shown = check.replace("NEIGHBOUR", neighbour);
        match outcome {
            Ok(what) => {
                reached += 1;
                out += &format!("reached {shown}: yes -- {}\n", one_line(&what));
            }
            Err(why) => out += &format!("reached {shown}: no -- {}\n", one_line(&why)),
        }
    }
    out += &format!("summary: reached {reached} of {}\n", CHECKS.len());
    out
}

fn one_line(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// `uid=.. gid=.. groups=..` of this process, from `/proc/self/status`.
fn identity() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uid = field("Uid:").first().copied().unwrap_or("?").to_string();
    let gid = field("Gid:").first().copied().unwrap_or("?").to_string();
    let groups = field("Groups:").join(",");
    format!("uid={uid} gid={gid} groups={groups}")
}

fn err(e: std::io::Error) -> String {
    e.to_string()
}

impl Probe {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn run(&self, check: &str) -> Outcome {
        let n = &self.neighbour;
        match check {
            "list temp/" => list(&self.path("temp")),
            "read temp/NEIGHBOUR-N" => self.in_folders(|f| {
                let yaml = f.join("config/keter.yaml");
                std::fs::read_to_string(&yaml)
                    .map(|t| format!("{}: {} bytes", yaml.display(), t.len()))
                    .or_else(|_| list(f))
                    .map_err(|e| format!("{}: {e}", f.display()))
            }),
            "write temp/NEIGHBOUR-N" => {
                self.in_folders(|f| write_and_remove(&f.join("probe-was-here")))
            }
            "write temp/" => write_and_remove(&self.path("temp/probe-was-here")),
            "list log/" => list(&self.path("log")),
            "read log/app-NEIGHBOUR.log" => read(&self.path(&format!("log/app-{n}.log"))),
            "write log/" => write_and_remove(&self.path("log/probe-was-here")),
            "read nginx/worker-files/requests.log" => {
                read(&self.path("nginx/worker-files/requests.log"))
            }
            "append nginx/worker-files/requests.log" => {
                open_to_append(&self.path("nginx/worker-files/requests.log"))
            }
            "list etc/" => list(&self.path("etc")),
            "read etc/processes" => read(&self.path("etc/processes")),
            "read etc/postgres.yaml" => read(&self.path("etc/postgres.yaml")),
            "read etc/certs/NEIGHBOUR-N" => {
                let certs = self.path("etc/certs");
                let mut found = Vec::new();
                if let Ok(dir) = std::fs::read_dir(&certs) {
                    for e in dir.flatten() {
                        if e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("{n}-"))
                        {
                            found.push(e.path());
                        }
                    }
                } else {
                    found.extend(self.numbered(&certs));
                }
                if found.is_empty() {
                    // Tell "cannot look" from "nothing there".
                    return list(&certs)
                        .and(Err(format!("no {n}-N folder in {}", certs.display())));
                }
                let mut last = String::new();
                for f in found {
                    match read(&f.join("key.pem")) {
                        Ok(what) => return Ok(what),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            "list incoming/" => list(&self.path("incoming")),
            "read incoming/NEIGHBOUR.keter" => read(&self.path(&format!("incoming/{n}.keter"))),
            // A dot name: keter ignores it even if the write went through.
            "write incoming/" => write_and_remove(&self.path("incoming/.probe-was-here")),
            "list nginx/apps/" => list(&self.path("nginx/apps")),
            "read nginx/apps/NEIGHBOUR.conf" => read(&self.path(&format!("nginx/apps/{n}.conf"))),
            "write nginx/" => write_and_remove(&self.path("nginx/probe-was-here")),
            // Not ending in .conf: Nginx would include it.
            "write nginx/apps/" => write_and_remove(&self.path("nginx/apps/.probe-was-here")),
            "write acme/" => write_and_remove(&self.path("acme/probe-was-here")),
            "list home/" => list(&self.path("home")),
            "read home/NEIGHBOUR" => list(&self.path(&format!("home/{n}"))),
            "signal NEIGHBOUR" => self.on_pids(|pid| {
                // SAFETY: signal 0 sends nothing; it only checks the permission to signal.
                if unsafe { libc::kill(pid, 0) } == 0 {
                    Ok(format!("may signal pid {pid}"))
                } else {
                    Err(format!("pid {pid}: {}", std::io::Error::last_os_error()))
                }
            }),
            "read NEIGHBOUR environment" => self.on_pids(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .map_err(err)
                    .and_then(|e| {
                        // An exited process reads as empty: that is not reaching it.
                        if e.is_empty() {
                            return Err(format!("pid {pid}: empty"));
                        }
                        let names: Vec<String> = e
                            .split(|b| *b == 0)
                            .filter_map(|v| {
                                let v = String::from_utf8_lossy(v);
                                v.split_once('=').map(|(k, _)| k.to_string())
                            })
                            .collect();
                        Ok(format!("pid {pid}: {}", names.join(",")))
                    })
            }),
            "read NEIGHBOUR memory map" => self.on_pids(|pid| {
                match std::fs::read(format!("/proc/{pid}/maps")) {
                    // An exited process reads as empty: that is not reaching it.
                    Ok(m) if m.is_empty() => Err(format!("pid {pid}: empty")),
                    Ok(m) => Ok(format!("pid {pid}: {} bytes", m.len())),
                    Err(e) => Err(format!("pid {pid}: {e}")),
                }
            }),
            "status interface" => self.status_get("/api/apps"),
            "read NEIGHBOUR output through the status interface" => {
                self.status_get(&format!("/api/apps/{n}/log"))
            }
            other => Err(format!("unknown check {other}")),
        }
    }

    /// Runs `f` on each folder of the neighbour; reached when one call is.
    fn in_folders(&self, f: impl Fn(&Path) -> Outcome) -> Outcome {
        if self.folders.is_empty() {
            return Err(format!("no temp/{}-N folder found", self.neighbour));
        }
        let mut last = String::new();
        for folder in &self.folders {
            match f(folder) {
                Ok(what) => return Ok(what),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn on_pids(&self, f: impl Fn(i32) -> Outcome) -> Outcome {
        if self.pids.is_empty() {
            return Err(format!("no process of {} found", self.neighbour));
        }
        let mut last = String::new();
        for pid in &self.pids {
            match f(*pid) {
                Ok(what) => return Ok(what),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The neighbour's unpack folders: listed if `temp/` can be listed, else found one by one
    /// with `stat`, as an attacker who knows keter's naming would.
    fn find_folders(&self) -> Vec<PathBuf> {
        let temp = self.path("temp");
        let prefix = format!("{}-", self.neighbour);
        if let Ok(dir) = std::fs::read_dir(&temp) {
            let mut v: Vec<PathBuf> = dir
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix(&prefix)
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .map(|e| e.path())
                .collect();
            v.sort();
            return v;
        }
        self.numbered(&temp)
    }

    /// `DIR/NEIGHBOUR-N` for every N that exists.
    fn numbered(&self, dir: &Path) -> Vec<PathBuf> {
        (1..=MAX_FOLDER_NUMBER)
            .map(|i| dir.join(format!("{}-{i}", self.neighbour)))
            .filter(|p| std::fs::symlink_metadata(p).is_ok())
            .collect()
    }

    /// Processes running from the neighbour's folders (their command line names them).
    fn find_pids(&self) -> Vec<i32> {
        let needle = format!("/temp/{}-", self.neighbour);
        let mut pids: Vec<i32> = std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                            .unwrap_or(false)
                    })
                    .collect()
            })
            .unwrap_or_default();
        pids.sort();
        pids
    }

    /// GET `path` from keter's status interface; reached when it answers 200.
    fn status_get(&self, path: &str) -> Outcome {
        let request = format!("GET {path} HTTP/1.1\r\nHost: keter\r\nConnection: close\r\n\r\n");
        let timeout = Some(Duration::from_secs(5));
        let mut answer = Vec::new();
        let got = if let Some(socket) = self.status.strip_prefix("unix:") {
            UnixStream::connect(socket).and_then(|mut s| {
                s.set_read_timeout(timeout)?;
                s.write_all(request.as_bytes())?;
                s.read_to_end(&mut answer)
            })
        } else {
            TcpStream::connect(&self.status).and_then(|mut s| {
                s.set_read_timeout(timeout)?;
                s.write_all(request.as_bytes())?;
                s.read_to_end(&mut answer)
            })
        };
        if let Err(e) = got
            && answer.is_empty()
        {
            return Err(format!("{}: {e}", self.status));
        }
        let text = String::from_utf8_lossy(&answer);
        let status_line = text.lines().next().unwrap_or("").to_string();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        if status_line.split_whitespace().nth(1) == Some("200") {
            Ok(format!("{status_line}: {body}"))
        } else if status_line.is_empty() {
            Err(format!("{}: closed without an answer", self.status))
        } else {
            Err(format!("{status_line}: {body}"))
        }
    }
}

fn list(dir: &Path) -> Outcome {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Ok(format!("{}: {}", dir.display(), names.join(" ")))
}

fn read(file: &Path) -> Outcome {
    std::fs::read(file)
        .map(|b| format!("{}: {} bytes", file.display(), b.len()))
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// Opens an existing file for appending and writes nothing: the permission is the finding.
fn open_to_append(file: &Path) -> Outcome {
    std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .map(|_| format!("opened {} to append", file.display()))
        .map_err(|e| format!("{}: {e}", file.display()))
}

fn write_and_remove(file: &Path) -> Outcome {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let _ = std::fs::remove_file(file);
    Ok(format!("created {}", file.display()))
}
