//! The thread that reads Nginx's request log (README, "Request metrics").
//!
//! Every server block of every app logs one line per request, in keter's format
//! (`line.rs`), to `ROOT/nginx/worker-files/requests.log` with `buffer=64k flush=1s`: each Nginx
//! worker collects lines and writes them at once when 64 KiB are full or a second after the
//! first, so the log costs a worker one system call per few hundred requests rather than one per
//! request (a datagram per request cost Nginx a tenth of its throughput: README, "Request
//! metrics"). Nginx's master opens the file (as root in a system install) and its workers
//! inherit it; at a reopen the master gives the file to the workers' user and each worker opens
//! it again by its name. The folder is searched only by keter's user and the workers' group
//! (`src/nginx/worker_files.rs`), so no app can read the traffic of another or write lines
//! into the file.
//!
//! This thread reads what was appended, four times a second, 256 KiB at a time, and counts the
//! whole lines of each read under one lock ([`Requests::count_lines`]), each at the time Nginx
//! logged it, so that late reads land in the right slot.
//!
//! * **Rotation.** Once the file has grown past [`ROTATE_AT`] and was read to its end, the
//!   thread renames it to `requests.log.1` (replacing the one before) and asks the Nginx
//!   controller to have Nginx reopen its logs (SIGUSR1, as logrotate does). Until then the
//!   workers append to the renamed file; the thread reads it on, and once Nginx has created the
//!   file anew (a different inode at the name) it reads that one from its start. The renamed
//!   file is read until the rotation after, for a worker that flushes its buffer late. Two
//!   files of at most [`ROTATE_AT`] and what came since stay on disk.
//! * **Restarts.** At start the thread reads `requests.log.1` and then `requests.log` from their
//!   beginning: the counts an earlier keter had (before an upgrade, a crash, a restart) come
//!   back as far as these files go, each at its own time.
//! * **Nothing blocks Nginx.** When the thread is slow or stopped (SIGSTOP), the file grows
//!   and is read later; nothing is lost. A backlog beyond [`MAX_BACKLOG`] (keter stopped for
//!   long while Nginx served on) is skipped to its last [`ROTATE_AT`], and the bytes skipped
//!   are counted.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Dropped, Requests, unix_now};

/// The file is renamed once it has grown past this and was read to its end.
pub const ROTATE_AT: u64 = 64 << 20;
/// A backlog larger than this is skipped to its last [`ROTATE_AT`].
pub const MAX_BACKLOG: u64 = 256 << 20;
/// How often the thread reads what was appended. Nginx writes at most a second after a line
/// (`flush=1s`), so a request is counted within about 1.25 s.
const POLL: Duration = Duration::from_millis(250);
/// A reopen asked for that did not bring a new file is asked for again after this.
const REOPEN_AGAIN: Duration = Duration::from_secs(30);
/// Bytes read at once.
const CHUNK: usize = 256 << 10;

/// Asks Nginx to reopen its log files (the Nginx controller's `reopen_logs`).
pub type Reopen = Box<dyn Fn() + Send>;

/// The running tailer; [`Tailer::stop`] ends it.
pub struct Tailer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The socket of the request datagrams of an older keter, beside the log.
const OLD_SOCKET: &str = "requests.sock";

/// Makes the request log's folder before any configuration that names the log is tested
/// (Nginx refuses a log whose folder does not exist): mode `0710`, as the Nginx controller
/// keeps it and gives it to the workers' group (`src/nginx/worker_files.rs`); removes the
/// socket an older keter left there.
pub fn prepare(log: &Path) -> io::Result<()> {
    let Some(dir) = log.parent() else {
        return Ok(());
    };
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o710)
        .create(dir)?;
    if std::fs::symlink_metadata(dir)?.is_dir() {
        // keter before the log file read a datagram per request on this socket; Nginx stops
        // sending there once it runs this keter's files, and nothing reads it any more.
        let old = dir.join(OLD_SOCKET);
        if std::fs::symlink_metadata(&old).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&old);
        }
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is not a folder", dir.display()),
        ))
    }
}

impl Tailer {
    /// Starts reading `log` (and `log.1`) into `requests`.
    pub fn start(log: &Path, requests: Arc<Requests>, reopen: Reopen) -> io::Result<Tailer> {
        prepare(log)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let mut files = Files::new(log.to_path_buf(), reopen, ROTATE_AT, MAX_BACKLOG);
        let thread = std::thread::Builder::new()
            .name("requests".into())
            .spawn(move || {
                files.start(&requests);
                while !stopped.load(Ordering::Relaxed) {
                    files.poll(&requests);
                    std::thread::sleep(POLL);
                }
                // What Nginx wrote until now.
                files.poll(&requests);
            })?;
        Ok(Tailer {
            stop,
            thread: Some(thread),
        })
    }

    /// Reads what is there and stops.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One open file and how far it was read.
struct Tail {
    file: File,
    inode: (u64, u64),
    offset: u64,
    /// The start of a line whose end was not written yet.
    partial: Vec<u8>,
    /// The line being read is not counted: why.
    skipping: Option<Skip>,
}

/// Why the rest of a line is passed over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// The backlog was skipped to within this line: its bytes are counted as skipped.
    Backlog,
    /// It is too long for keter's format: counted once, as a malformed line.
    TooLong,
}

impl Tail {
    fn open(path: &Path) -> Option<Tail> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let m = file.metadata().ok()?;
        m.is_file().then(|| Tail {
            file,
            inode: (m.dev(), m.ino()),
            offset: 0,
            partial: Vec::new(),
            skipping: None,
        })
    }

    /// Counts every whole line appended since the last read.
    fn read(&mut self, requests: &Requests, buf: &mut [u8], limits: Limits) {
        let Ok(size) = self.file.metadata().map(|m| m.len()) else {
            return;
        };
        if size < self.offset {
            // Truncated by someone: what is there now is new.
            self.offset = 0;
            self.partial.clear();
            self.skipping = None;
        }
        if size - self.offset > limits.max_backlog {
            let skip_to = size - limits.rotate_at;
            let skipped = skip_to - self.offset + self.partial.len() as u64;
            requests.skipped_bytes.fetch_add(skipped, Ordering::Relaxed);
            self.offset = skip_to;
            self.partial.clear();
            // The line the skip ends in is skipped too.
            self.skipping = Some(Skip::Backlog);
        }
        if self.file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let now = unix_now();
        loop {
            let n = match self.file.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("keter: request metrics: cannot read the request log: {e}");
                    break;
                }
            };
            self.offset += n as u64;
            let mut chunk = &buf[..n];
            // The end of the line the last read stopped in.
            if self.skipping.is_some() || !self.partial.is_empty() {
                let Some(end) = memchr::memchr(b'\n', chunk) else {
                    self.continued(requests, chunk);
                    continue;
                };
                if let Some(why) = self.skipping.take() {
                    if why == Skip::Backlog {
                        requests
                            .skipped_bytes
                            .fetch_add(end as u64 + 1, Ordering::Relaxed);
                    }
                } else {
                    self.partial.extend_from_slice(&chunk[..=end]);
                    requests.count_lines(&self.partial, now);
                    self.partial.clear();
                }
                chunk = &chunk[end + 1..];
            }
            // The whole lines, and the start of the next.
            let whole = memchr::memrchr(b'\n', chunk).map_or(0, |end| end + 1);
            if whole > 0 {
                requests.count_lines(&chunk[..whole], now);
            }
            self.continued(requests, &chunk[whole..]);
        }
    }

    /// Keeps `rest`, the start or more of a line whose end was not read yet; passes over it
    /// when the line is skipped or too long for keter's format.
    fn continued(&mut self, requests: &Requests, rest: &[u8]) {
        if let Some(why) = self.skipping {
            if why == Skip::Backlog {
                requests
                    .skipped_bytes
                    .fetch_add(rest.len() as u64, Ordering::Relaxed);
            }
        } else if self.partial.len() + rest.len() > MAX_LINE {
            // No line of keter's format is this long: the rest of it is dropped.
            requests.dropped(Dropped::Malformed);
            self.partial.clear();
            self.skipping = Some(Skip::TooLong);
        } else {
            self.partial.extend_from_slice(rest);
        }
    }
}

/// Longer lines are not keter's: one is about 100 bytes plus the app's name.
const MAX_LINE: usize = 4096;

/// [`ROTATE_AT`] and [`MAX_BACKLOG`] (smaller in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    rotate_at: u64,
    max_backlog: u64,
}

/// The log and the renamed one, and the rotation in progress.
struct Files {
    limits: Limits,
    path: PathBuf,
    renamed: PathBuf,
    current: Option<Tail>,
    previous: Option<Tail>,
    reopen: Reopen,
    /// When Nginx was asked to reopen its logs and has not created the file anew yet.
    asked: Option<Instant>,
    buf: Vec<u8>,
}

impl Files {
    fn new(path: PathBuf, reopen: Reopen, rotate_at: u64, max_backlog: u64) -> Files {
        let mut renamed = path.clone().into_os_string();
        renamed.push(".1");
        Files {
            limits: Limits {
                rotate_at,
                max_backlog: max_backlog.max(rotate_at),
            },
            path,
            renamed: renamed.into(),
            current: None,
            previous: None,
            reopen,
            asked: None,
            buf: vec![0; CHUNK],
        }
    }

    /// Reads the renamed log, then the log, from their start.
    fn start(&mut self, requests: &Requests) {
        self.previous = Tail::open(&self.renamed);
        if let Some(p) = &mut self.previous {
            p.read(requests, &mut self.buf, self.limits);
        }
        self.poll(requests);
    }

    fn poll(&mut self, requests: &Requests) {
        if let Some(p) = &mut self.previous {
            p.read(requests, &mut self.buf, self.limits);
        }
        if let Some(c) = &mut self.current {
            c.read(requests, &mut self.buf, self.limits);
        }
        // A new file at the name (Nginx reopened, or someone else moved the log): the one read
        // until now is kept for late writes, the one before it is done.
        let at_name = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if at_name.is_some()
            && at_name != self.current.as_ref().map(|c| c.inode)
            && let Some(mut new) = Tail::open(&self.path)
        {
            new.read(requests, &mut self.buf, self.limits);
            if let Some(old) = self.current.replace(new) {
                self.previous = Some(old);
            }
            self.asked = None;
        }
        let Some(c) = &self.current else {
            return;
        };
        match self.asked {
            None if c.offset >= self.limits.rotate_at => {
                if let Err(e) = std::fs::rename(&self.path, &self.renamed) {
                    log::error!(
                        "keter: request metrics: cannot rename {} to {}: {e}",
                        self.path.display(),
                        self.renamed.display()
                    );
                    return;
                }
                (self.reopen)();
                self.asked = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= REOPEN_AGAIN => {
                (self.reopen)();
                self.asked = Some(Instant::now());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
