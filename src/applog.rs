//! An app's output: every line its processes print goes, with a timestamp, to
//! `ROOT/log/app-NAME.log` (or to keter's stderr prefixed `app-NAME>` with `rotate-logs:
//! false`), and the last lines stay in memory so that a failed deploy can say what the app
//! printed last.
//!
//! A line is made printable once, here, when it enters the log ([`printable`]): an app's
//! bytes reach a terminal (`keter status`, `tail -f` on its log file), the journal (through
//! keter's stderr) and keter's own messages (a readiness failure quotes the last lines), and
//! none of them may be handed an escape sequence or a NUL (README, "Supervision").
//!
//! Nothing that reads an app's output waits for the disk: lines are queued for the one writer
//! thread that all apps share, and a line that does not fit the app's share of the queue is
//! dropped and counted (a slow or full disk must never block the app on its own stdout). The
//! reader (`src/childwatch.rs`) reads a pipe no faster than [`AppLog::room`] allows, so that
//! only lines an app prints while its pipe is about full are ever dropped.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use crossbeam_channel::{Sender, unbounded};

/// How many recent lines are kept in memory.
const TAIL_LINES: usize = 200;
/// An app's lines waiting for the writer before its new ones are dropped.
pub const QUEUE_LINES: usize = 4096;
/// Longest line kept; longer ones are cut (a binary blob on stdout has no newlines).
pub const MAX_LINE: usize = 16 * 1024;

/// Where an app's lines end up.
#[derive(Debug, Clone)]
pub enum LogTarget {
    /// A file rotated by size: at `max_bytes` it becomes `PATH.1` (older ones shift up to
    /// `PATH.KEEP`, the oldest is deleted) and a new file starts.
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
    /// keter's stderr, each line prefixed `app-NAME>`.
    Stderr(String),
}

/// One app's log. Cheap to clone.
#[derive(Clone)]
pub struct AppLog {
    shared: Arc<Shared>,
    writer: Sender<Queued>,
}

impl std::fmt::Debug for AppLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppLog")
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// What the writer is sent.
enum Queued {
    /// A line, with the log it belongs to.
    Line(Arc<Shared>, String),
    /// Answer once every line queued before is written.
    Flush(Sender<()>),
}

struct Shared {
    tail: Mutex<VecDeque<String>>,
    dropped: AtomicU64,
    /// This app's lines queued for the writer and not yet written. The queue itself grows on
    /// demand (a preallocated bounded channel cost 128 KiB per app), and this count bounds
    /// the app's share of it.
    queued: AtomicUsize,
    /// Only the writer thread uses it; closed when the last handle and queued line are gone.
    sink: Mutex<Sink>,
    /// Dropped lines already reported in the log.
    reported: AtomicU64,
}

impl AppLog {
    /// Opens the target (the file is created now, so that a problem shows at once).
    pub fn open(target: LogTarget) -> std::io::Result<AppLog> {
        let writer = writer()?;
        let shared = Arc::new(Shared {
            tail: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            sink: Mutex::new(Sink::open(target)?),
            reported: AtomicU64::new(0),
        });
        Ok(AppLog { shared, writer })
    }

    /// Records one line (without its newline), made [`printable`] first.
    pub fn line(&self, text: &str) {
        let stamped = format!("{} {}", timestamp(SystemTime::now()), printable(text));
        {
            let mut tail = self.shared.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(stamped.clone());
        }
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= QUEUE_LINES
            || self
                .writer
                .send(Queued::Line(self.shared.clone(), stamped))
                .is_err()
        {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let tail = self.shared.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter()
            .skip(tail.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// How many more lines fit this app's share of the writer's queue before they are dropped.
    pub fn room(&self) -> usize {
        QUEUE_LINES.saturating_sub(self.shared.queued.load(Ordering::Relaxed))
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Returns once every line queued so far is written (for an in-place upgrade: nothing read
/// from the apps may be left in memory when the process image is replaced).
pub fn flush() {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Ok(writer) = writer()
        && writer.send(Queued::Flush(tx)).is_ok()
    {
        let _ = rx.recv();
    }
}

/// The queue of the one writer thread, started at the first use.
fn writer() -> std::io::Result<Sender<Queued>> {
    static WRITER: OnceLock<std::io::Result<Sender<Queued>>> = OnceLock::new();
    match WRITER.get_or_init(|| {
        let (tx, rx) = unbounded::<Queued>();
        std::thread::Builder::new()
            .name("app-log".into())
            .spawn(move || write_lines(rx))?;
        Ok(tx)
    }) {
        Ok(tx) => Ok(tx.clone()),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("the log writer thread did not start: {e}"),
        )),
    }
}

fn write_lines(rx: crossbeam_channel::Receiver<Queued>) {
    for queued in rx {
        let (log, line) = match queued {
            Queued::Line(log, line) => (log, line),
            Queued::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        log.queued.fetch_sub(1, Ordering::Relaxed);
        let mut sink = log.sink.lock().unwrap_or_else(|e| e.into_inner());
        sink.write_line(&line);
        let dropped = log.dropped.load(Ordering::Relaxed);
        let reported = log.reported.swap(dropped, Ordering::Relaxed);
        if dropped > reported {
            sink.write_line(&format!(
                "{} keter: {} lines of output were dropped because the log could not keep up",
                timestamp(SystemTime::now()),
                dropped - reported
            ));
        }
    }
}

/// The writer's end: a file it rotates, or stderr.
enum Sink {
    File {
        path: PathBuf,
        file: Option<File>,
        size: u64,
        max_bytes: u64,
        keep: u32,
    },
    Stderr(String),
}

impl Sink {
    fn open(target: LogTarget) -> std::io::Result<Sink> {
        Ok(match target {
            LogTarget::File {
                path,
                max_bytes,
                keep,
            } => {
                let file = OpenOptions::new().create(true).append(true).open(&path)?;
                let size = file.metadata()?.len();
                Sink::File {
                    path,
                    file: Some(file),
                    size,
                    max_bytes,
                    keep,
                }
            }
            LogTarget::Stderr(name) => Sink::Stderr(format!("app-{name}> ")),
        })
    }

    /// Writes one line; a failed write (disk full) loses that line only.
    fn write_line(&mut self, line: &str) {
        match self {
            Sink::Stderr(prefix) => {
                let _ = writeln!(std::io::stderr().lock(), "{prefix}{line}");
            }
            Sink::File {
                path,
                file,
                size,
                max_bytes,
                keep,
            } => {
                if file.is_none() {
                    *file = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&*path)
                        .ok();
                }
                if let Some(f) = file
                    && writeln!(f, "{line}").is_ok()
                {
                    *size += line.len() as u64 + 1;
                }
                if *size >= *max_bytes {
                    // Rotation by rename: no copy, no unbounded buffer (Keter #280, #288).
                    *file = None;
                    rotate(path, *keep);
                    *size = 0;
                }
            }
        }
    }
}

/// `text` with every control character written out as `\xHH` (its code point in hex): the C0
/// controls but tab (so NUL, ESC, BEL, CR, newline), DEL and the C1 controls U+0080-U+009F
/// (U+009B is CSI, an escape sequence on its own for terminals that read C1). An app's output
/// is not to be trusted with any of them: ESC starts terminal escape sequences (window title,
/// clear screen, hidden text, OSC 52 clipboard writes), and journald ends a record at NUL, so
/// that what follows would become an entry of keter's own. A backslash stays as it is, so that
/// the function can be applied again without changing anything (keter's own messages quote
/// lines that are printable already). Borrows when there is nothing to escape.
pub fn printable(text: &str) -> Cow<'_, str> {
    // Bytes alone find every candidate: a C1 control is 0xC2 0x80-0x9F in UTF-8.
    let suspect = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f || *b == 0xc2;
    if !text.as_bytes().iter().any(suspect) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_escaped(c) {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Whether [`printable`] writes `c` out.
fn is_escaped(c: char) -> bool {
    (c.is_ascii_control() && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c)
}

/// `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ... up to `PATH.KEEP`.
fn rotate(path: &std::path::Path, keep: u32) {
    let numbered = |i: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if keep == 0 {
        let _ = std::fs::remove_file(path);
        return;
    }
    let _ = std::fs::remove_file(numbered(keep));
    for i in (1..keep).rev() {
        let _ = std::fs::rename(numbered(i), numbered(i + 1));
    }
    let _ = std::fs::rename(path, numbered(1));
}

/// `2026-11-27T13:45:01.123Z` without a date library.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_786_501_123);
        assert_eq!(timestamp(t), "2026-11-27T13:35:01.123Z");
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn control_characters_are_written_out() {
        assert!(matches!(printable("plain\ttext é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\x1b]0;title\x07\x1b[2J\x1b]52;c;aGk=\x07\0<3>x\r\n\x7f"),
            "\\x1b]0;title\\x07\\x1b[2J\\x1b]52;c;aGk=\\x07\\x00<3>x\\x0d\\x0a\\x7f"
        );
        // C1 controls are characters of their own in UTF-8; the letters around them stay.
        assert_eq!(printable("a\u{9b}2Jb\u{85}\u{a0}"), "a\\x9b2Jb\\x85\u{a0}");
        // Applied again it changes nothing: keter's messages quote printable lines.
        let once = printable("\x1b[31mred\\x1b").into_owned();
        assert_eq!(printable(&once), once);
    }

    #[test]
    fn lines_reach_file_and_tail() {
        let dir = std::env::temp_dir().join(format!("keter-applog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app-x.log");
        let log = AppLog::open(LogTarget::File {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 2,
        })
        .unwrap();
        log.line("hello");
        log.line("world\x1b[2J\0");
        assert!(log.tail(1)[0].ends_with(" world\\x1b[2J\\x00"));
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                assert!(text.lines().next().unwrap().ends_with(" hello"));
                assert!(text.ends_with(" world\\x1b[2J\\x00\n"), "{text:?}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "lines never written");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_flooding_app_loses_only_its_own_lines() {
        let dir = std::env::temp_dir().join(format!("keter-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = |name: &str| {
            AppLog::open(LogTarget::File {
                path: dir.join(name),
                max_bytes: 1 << 30,
                keep: 1,
            })
            .unwrap()
        };
        let (flood, quiet) = (open("flood.log"), open("quiet.log"));
        let noise = "x".repeat(100);
        for i in 0..200_000 {
            flood.line(&noise);
            if i % 1000 == 0 {
                quiet.line(&format!("quiet {i}"));
            }
        }
        assert!(flood.dropped() > 0, "the flood never outran the writer");
        assert_eq!(quiet.dropped(), 0);
        drop((flood, quiet));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(dir.join("quiet.log"))
            .unwrap_or_default()
            .lines()
            .count()
            < 200
        {
            assert!(std::time::Instant::now() < deadline, "quiet lines lost");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotates_by_size_keeping_n_files() {
        let dir = std::env::temp_dir().join(format!("keter-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app-r.log");
        let mut sink = Sink::open(LogTarget::File {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
        })
        .unwrap();
        for i in 0..40 {
            sink.write_line(&format!("line {i:02} {}", "x".repeat(40)));
        }
        let names: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // 49-byte lines and a 100-byte limit: each file holds three lines.
        assert_eq!(names, ["app-r.log", "app-r.log.1", "app-r.log.2"]);
        let newest = std::fs::read_to_string(dir.join("app-r.log.1")).unwrap();
        assert!(newest.starts_with("line 36"), "{newest}");
        assert_eq!(newest.lines().count(), 3);
        let older = std::fs::read_to_string(dir.join("app-r.log.2")).unwrap();
        assert!(older.starts_with("line 33"), "{older}");
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.starts_with("line 39"), "{current}");
        assert_eq!(current.lines().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
