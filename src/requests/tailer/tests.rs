//! The tailer on real files, with a fake Nginx: a writer that appends through one descriptor,
//! as a worker does, and opens the log anew when asked to reopen.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::requests::HOUR;
use crate::requests::line::iso8601_utc;

struct Nginx {
    path: PathBuf,
    file: File,
    reopen: Arc<AtomicBool>,
}

impl Nginx {
    fn new(path: &Path) -> Nginx {
        Nginx {
            path: path.to_path_buf(),
            file: Nginx::open(path),
            reopen: Arc::new(AtomicBool::new(false)),
        }
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.file.write_all(bytes).unwrap();
    }

    /// Writes `n` lines of release `release` logged at `time`.
    fn lines(&mut self, n: usize, release: u64, time: u64) {
        let mut text = String::new();
        for i in 0..n {
            let status = if i % 10 == 0 { 500 } else { 200 };
            text.push_str(&format!(
                "k3|shop|{release}|{}|{status}|612|0.012|0.011\n",
                iso8601_utc(time)
            ));
        }
        self.write(text.as_bytes());
    }

    /// Acts on a reopen asked for, as Nginx's master and workers do at SIGUSR1.
    fn reopen_if_asked(&mut self) -> bool {
        let asked = self.reopen.swap(false, Ordering::Relaxed);
        if asked {
            self.file = Nginx::open(&self.path);
        }
        asked
    }

    fn asked(&self) -> Reopen {
        let flag = self.reopen.clone();
        Box::new(move || flag.store(true, Ordering::Relaxed))
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keter-tailer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.join("requests").join("requests.log")
}

fn total(r: &Requests) -> u64 {
    r.summary("shop", unix_now())
        .map(|s| s.total.requests)
        .unwrap_or(0)
}

#[test]
fn lines_are_counted_once_whole_at_the_time_nginx_logged_them() {
    let path = dir("whole");
    prepare(&path).unwrap();
    let mut nginx = Nginx::new(&path);
    let r = Requests::default();
    let mut files = Files::new(path.clone(), nginx.asked(), 1 << 20, 4 << 20);
    files.start(&r);
    let now = unix_now();
    // A line of the format before (an older keter's Nginx wrote it before an upgrade), then a
    // line Nginx's buffer wrote in two parts, read between them.
    nginx.write(format!("k2|shop|1|{}.000|200|10|200|0.010|0.010\nk3|sh", now - 100).as_bytes());
    files.poll(&r);
    assert_eq!(total(&r), 1);
    nginx.write(format!("op|1|{}|404|10|-|-\nnot keter's\n", iso8601_utc(now - 30)).as_bytes());
    files.poll(&r);
    assert_eq!(total(&r), 2);
    assert_eq!(r.lines.load(Ordering::Relaxed), 3);
    assert_eq!(r.malformed.load(Ordering::Relaxed), 1);
    // Each in the slot of its own time, not of the read.
    let hour = r.series("shop", HOUR, now).unwrap();
    let at = |t: u64| {
        hour.iter()
            .find(|p| p.start == t / 10 * 10)
            .unwrap()
            .requests_per_second
    };
    assert_eq!(at(now - 100), 0.1);
    assert_eq!(at(now - 30), 0.1);
    // A line far too long is dropped, not kept growing.
    nginx.write(&vec![b'x'; 3 * MAX_LINE]);
    files.poll(&r);
    nginx.write(b"\n");
    nginx.lines(1, 1, now);
    files.poll(&r);
    assert_eq!(total(&r), 3);
    assert!(files.current.as_ref().unwrap().partial.is_empty());
    // Counted once, as one more malformed line; no backlog was skipped.
    assert_eq!(r.malformed.load(Ordering::Relaxed), 2);
    assert_eq!(r.skipped_bytes.load(Ordering::Relaxed), 0);
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

/// Rotation loses nothing: not what a worker writes into the renamed file before it reopens,
/// nor what it writes after, and a keter started afresh counts both files again.
#[test]
fn a_rotation_and_a_restart_lose_no_line() {
    let path = dir("rotate");
    prepare(&path).unwrap();
    let mut nginx = Nginx::new(&path);
    let r = Requests::default();
    let mut files = Files::new(path.clone(), nginx.asked(), 4096, 1 << 20);
    files.start(&r);
    let now = unix_now();
    nginx.lines(100, 1, now - 5);
    files.poll(&r);
    assert_eq!(total(&r), 100);
    let renamed = path.with_file_name("requests.log.1");
    assert!(
        renamed.exists() && !path.exists(),
        "rotated past 4096 bytes"
    );
    // Until Nginx reopens, its worker writes into the renamed file.
    nginx.lines(5, 1, now - 4);
    files.poll(&r);
    assert_eq!(total(&r), 105);
    assert!(nginx.reopen_if_asked());
    nginx.lines(7, 2, now - 3);
    files.poll(&r);
    assert_eq!(total(&r), 112);
    // No second reopen is asked for while the new file is short.
    files.poll(&r);
    assert!(!nginx.reopen_if_asked());

    // A worker that flushes into the renamed file late still counts.
    let mut late = OpenOptions::new().append(true).open(&renamed).unwrap();
    late.write_all(format!("k3|shop|1|{}|200|1|0.001|0.001\n", iso8601_utc(now - 4)).as_bytes())
        .unwrap();
    files.poll(&r);
    assert_eq!(total(&r), 113);

    // A keter started afresh reads both files from their start.
    let again = Requests::default();
    let mut files = Files::new(path.clone(), Box::new(|| {}), 4096, 1 << 20);
    files.start(&again);
    assert_eq!(total(&again), 113);
    let s = again.summary("shop", unix_now()).unwrap();
    assert_eq!(
        s.releases
            .iter()
            .map(|r| (r.release, r.counters.requests))
            .collect::<Vec<_>>(),
        [(2, 7), (1, 106)]
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

/// A backlog beyond the bound (keter stopped while Nginx served on) is skipped to its last
/// part, and what was skipped is counted in bytes.
#[test]
fn a_backlog_too_large_is_skipped_and_counted() {
    let path = dir("backlog");
    prepare(&path).unwrap();
    let mut nginx = Nginx::new(&path);
    let now = unix_now();
    nginx.lines(1000, 1, now);
    let size = std::fs::metadata(&path).unwrap().len();
    let r = Requests::default();
    let mut files = Files::new(path.clone(), nginx.asked(), 8192, 16384);
    files.start(&r);
    let counted = total(&r);
    let skipped = r.skipped_bytes.load(Ordering::Relaxed);
    assert!(counted > 0 && counted < 1000, "{counted}");
    // Every byte was either a counted line or skipped.
    let line = size / 1000;
    assert_eq!(skipped + counted * line, size);
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

/// The thread itself: a request log written while it runs is counted, and a folder it makes is
/// searched only by keter's user and the workers' group.
#[test]
fn the_tailer_thread_counts_what_nginx_appends() {
    use std::os::unix::fs::PermissionsExt;
    let path = dir("thread");
    let requests = Arc::new(Requests::default());
    let tailer = Tailer::start(&path, requests.clone(), Box::new(|| {})).unwrap();
    let mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o710);
    let mut nginx = Nginx::new(&path);
    nginx.lines(1000, 3, unix_now());
    let start = Instant::now();
    while requests.lines.load(Ordering::Relaxed) < 1000 {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    tailer.stop();
    let s = requests.summary("shop", unix_now()).unwrap();
    assert_eq!(s.total.requests, 1000);
    assert_eq!(s.total.by_class["2xx"], 900);
    assert_eq!(s.total.by_class["5xx"], 100);
    let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
}

/// The datagram socket of a keter from before the log file is removed, and nothing else is.
#[test]
fn an_older_keters_socket_is_removed() {
    let path = dir("oldsocket");
    let folder = path.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&folder).unwrap();
    let socket = std::os::unix::net::UnixDatagram::bind(folder.join("requests.sock")).unwrap();
    std::fs::write(folder.join("other"), "kept").unwrap();
    prepare(&path).unwrap();
    assert!(std::fs::symlink_metadata(folder.join("requests.sock")).is_err());
    assert!(folder.join("other").exists());
    drop(socket);
    // A file of that name that is not a socket is not keter's old socket.
    std::fs::write(folder.join("requests.sock"), "not a socket").unwrap();
    prepare(&path).unwrap();
    assert!(folder.join("requests.sock").exists());
    let _ = std::fs::remove_dir_all(folder.parent().unwrap());
}
