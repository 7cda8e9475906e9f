//! A hostile app, and a hostile deployer, for keter's tests: each races one of keter's own
//! file operations as root, in the way README "Security" says keter withstands. The
//! integration tests (`tests/integration/attacks.rs`) and the package test
//! (`scripts/test-package`) run it and then look, as root, at what it reached.
//!
//! ```text
//! attacker [--version-string V] [--race-static FOLDER=DECOY] [--link NAME=TARGET]...
//!                                                               (as an app: listens on $PORT)
//! attacker exchange NAME OTHER SECONDS                          (as a deployer)
//! ```
//!
//! As an app it answers `GET /` with its version string, and:
//! * `GET /race-handover?decoy=DECOY`: starts racing keter's hand-over of the app's next
//!   version folder (`temp/SELF-M`, M above its own number). The moment a folder in it is the
//!   app's own, it renames the folder away and puts a symlink to `DECOY` in its place, so that a
//!   keter that then changes the owner of the entries it listed inside, by path, changes those
//!   of `DECOY` instead. Answers `racing` at once; the race goes on for two minutes or until it
//!   swapped every folder of one version.
//! * `--race-static FOLDER=DECOY` (given to the new version): at start it makes `FOLDER` (a
//!   folder of its static root) with 2000 files `f0` ... `f1999` and watches it; the moment its
//!   group changes (keter opening the static root to Nginx's workers), it swaps it for a symlink
//!   to `DECOY`, which holds root's files of the same names.
//! * `--link NAME=TARGET`: at start, replaces its own file `NAME` with a symlink to `TARGET`
//!   (a stanza's certificate, say, pointed at another app's key that keter copied), so that a
//!   keter that reads the bundle's file again, as root, reads `TARGET`.
//! * `GET /snoop?app=NAME&file=REL&secs=N`: for N seconds tries to read `REL` in every folder
//!   `temp/NAME-M` it can find, as a neighbour's new version is unpacked; each success is
//!   reported as `snoop: read temp/NAME-M/REL`.
//! * `GET /report`: one line per race, `handover: swapped N folders of temp/X-M` and
//!   `static: swapped FOLDER` (or why not), for the log of a failed test. The same lines are
//!   appended to `$HOME/attacker.report`, which outlives the version that wrote them.
//!
//! As a deployer, `exchange NAME OTHER SECONDS` swaps the two names (`renameat2` with
//! `RENAME_EXCHANGE`, atomic) as fast as it can for `SECONDS`: a bundle file and a symlink to a
//! bundle the deployer cannot read, or a FIFO, take turns at the name keter opens.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const STATIC_FILES: usize = 2000;

/// What the races did, kept for `/report` and written to `$HOME/attacker.report`.
#[derive(Default)]
struct Report(Mutex<Vec<String>>);

impl Report {
    fn push(&self, line: String) {
        if let Some(home) = std::env::var_os("HOME") {
            let path = Path::new(&home).join("attacker.report");
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        self.0.lock().unwrap().push(line);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("exchange") {
        let [_, a, b, secs] = args.as_slice() else {
            panic!("attacker exchange NAME OTHER SECONDS");
        };
        exchange(Path::new(a), Path::new(b), secs.parse().expect("SECONDS"));
        return;
    }
    let mut version = "attacker".to_string();
    let report = Arc::new(Report::default());
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--version-string" => {
                version = args[i + 1].clone();
                i += 1;
            }
            "--link" => {
                let (name, target) = args[i + 1].split_once('=').expect("NAME=TARGET");
                let _ = std::fs::remove_file(name);
                std::os::unix::fs::symlink(target, name).expect("symlink");
                i += 1;
            }
            "--race-static" => {
                let (folder, decoy) = args[i + 1].split_once('=').expect("FOLDER=DECOY");
                let (folder, decoy) = (PathBuf::from(folder), PathBuf::from(decoy));
                prepare_static(&folder);
                let report = report.clone();
                std::thread::spawn(move || race_static(&folder, &decoy, &report));
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT must be set");
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind");
    println!("attacker {version}: listening on port {port}");
    for stream in listener.incoming().flatten() {
        let (version, report) = (version.clone(), report.clone());
        std::thread::spawn(move || serve(stream, &version, &report));
    }
}

fn serve(stream: TcpStream, version: &str, report: &Arc<Report>) {
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
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) if header.trim_end().is_empty() => break,
                Ok(_) => {}
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let body = match path {
            "/race-handover" => match query.strip_prefix("decoy=") {
                Some(decoy) => {
                    let (decoy, report) = (PathBuf::from(decoy), report.clone());
                    std::thread::spawn(move || race_handover(&decoy, &report));
                    "racing\n".to_string()
                }
                None => "needs ?decoy=PATH\n".to_string(),
            },
            "/snoop" => {
                let get = |k: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")[..]))
                        .map(str::to_string)
                };
                match (get("app"), get("file"), get("secs")) {
                    (Some(app), Some(file), Some(secs)) => {
                        let report = report.clone();
                        let secs: u64 = secs.parse().unwrap_or(10);
                        std::thread::spawn(move || snoop(&app, &file, secs, &report));
                        "snooping\n".to_string()
                    }
                    _ => "needs ?app=NAME&file=REL&secs=N\n".to_string(),
                }
            }
            "/report" => {
                let lines = report.0.lock().unwrap().join("\n");
                format!("{lines}\n")
            }
            _ => format!("{version}\n"),
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Watches for the next version folder of this app and swaps each of its folders for a
/// symlink to `decoy` as soon as it is the app's own.
fn race_handover(decoy: &Path, report: &Report) {
    let cwd = std::env::current_dir().expect("cwd");
    let own = cwd.file_name().unwrap().to_string_lossy().into_owned();
    let (app, n) = own.rsplit_once('-').expect("temp/NAME-N");
    let n: u64 = n.parse().expect("temp/NAME-N");
    let temp = cwd.parent().unwrap().to_path_buf();
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut swapped = Vec::new();
    while Instant::now() < deadline {
        for m in n + 1..n + 500 {
            let top = temp.join(format!("{app}-{m}"));
            // Until keter gives the folder to the app, it cannot even look inside.
            if !std::fs::symlink_metadata(&top).is_ok_and(|md| md.uid() == me) {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&top) else {
                continue;
            };
            let folders: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|md| md.is_dir()))
                .collect();
            let mut left = folders.clone();
            let until = Instant::now() + Duration::from_secs(5);
            while !left.is_empty() && Instant::now() < until {
                left.retain(|folder| {
                    let mine = std::fs::symlink_metadata(folder).is_ok_and(|md| md.uid() == me);
                    if mine && swap(folder, decoy) {
                        swapped.push(folder.clone());
                        return false;
                    }
                    true
                });
            }
            report.push(format!(
                "handover: swapped {} folders of {} ({})",
                swapped.len(),
                top.display(),
                swapped
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            return;
        }
    }
    report.push("handover: no next version folder became the app's".into());
}

/// Tries to read `file` in every `temp/APP-M` for `secs` seconds.
fn snoop(app: &str, file: &str, secs: u64, report: &Report) {
    let cwd = std::env::current_dir().expect("cwd");
    let temp = cwd.parent().unwrap().to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut read = 0;
    while Instant::now() < deadline {
        for m in 1..1000 {
            let path = temp.join(format!("{app}-{m}")).join(file);
            if let Ok(text) = std::fs::read_to_string(&path) {
                report.push(format!(
                    "snoop: read {}: {}",
                    path.display(),
                    text.lines().next().unwrap_or("")
                ));
                read += 1;
                if read > 5 {
                    return;
                }
            }
        }
    }
    report.push(format!("snoop: read nothing of {app}'s folders"));
}

/// Renames `folder` away and puts a symlink to `decoy` in its place.
fn swap(folder: &Path, decoy: &Path) -> bool {
    let mut away = folder.as_os_str().to_owned();
    away.push(".orig");
    std::fs::rename(folder, &away).is_ok() && std::os::unix::fs::symlink(decoy, folder).is_ok()
}

/// The folder of the static root that will be swapped: as many files as the decoy has.
fn prepare_static(folder: &Path) {
    let _ = std::fs::create_dir_all(folder);
    for i in 0..STATIC_FILES {
        let _ = std::fs::write(folder.join(format!("f{i}")), "the app's own file\n");
    }
}

/// Swaps `folder` for a symlink to `decoy` the moment its group changes.
fn race_static(folder: &Path, decoy: &Path, report: &Report) {
    let before = std::fs::symlink_metadata(folder).map(|m| m.gid()).ok();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let now = std::fs::symlink_metadata(folder).map(|m| m.gid()).ok();
        if now != before {
            let line = if swap(folder, decoy) {
                format!("static: swapped {}", folder.display())
            } else {
                format!("static: could not swap {}", folder.display())
            };
            report.push(line);
            return;
        }
    }
    report.push(format!("static: {} never changed group", folder.display()));
}

/// Swaps the names `a` and `b` for `secs` seconds, atomically each time.
fn exchange(a: &Path, b: &Path, secs: f64) {
    let ca = CString::new(a.as_os_str().as_bytes()).unwrap();
    let cb = CString::new(b.as_os_str().as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut swaps = 0u64;
    while Instant::now() < deadline {
        // SAFETY: two valid NUL-terminated paths.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
        swaps += 1;
        // A pause now and then, so that keter sees the names settle often.
        if swaps.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    println!("{swaps} exchanges");
}
