//! The one thread that watches every app process: it reads their output pipes into their logs
//! and learns of their exits, from a single epoll set of pipes and pidfds.
//!
//! A reader thread per pipe and a waiter thread per process cost 200 apps 400 threads and
//! several megabytes of stacks; this costs one thread whatever the number of apps. Nothing the
//! thread calls blocks: pipes are non-blocking, [`AppLog::line`] only queues, and the exit
//! callbacks only send to a channel.
//!
//! Processes are known by pid and pidfd, not by `std::process::Child`, so that a process keter
//! did not start in this process image is watched the same way: after an in-place upgrade
//! (`src/handover.rs`) the apps are still keter's children and their exit status is reaped
//! here; after a keter that died was started again they are not, and only the exit itself is
//! known. [`pause`] stops the thread for a handover and hands out what it holds.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::applog::{AppLog, MAX_LINE, QUEUE_LINES};

/// Called on the watch thread with the pid and exit status once the process has exited (and,
/// if it is keter's child, been reaped). The status is `None` for a process keter did not
/// start, whose parent is someone else.
pub type OnExit = Box<dyn FnOnce(i32, Option<ExitStatus>) + Send>;

/// Bytes read from one pipe per wake-up before the other pipes get their turn (the epoll set
/// is level-triggered, so whatever is left wakes the thread again).
const READ_PER_TURN: usize = 64 * 1024;
/// The epoll token of the descriptor that wakes the thread to pause it.
const WAKE: u64 = 0;
/// A pipe is read only while its app has at least this much room in the log writer's queue,
/// and then at most one byte per free place (no read can bring more lines than fit): the rest
/// waits in the pipe, its kernel buffer. Without it, a backlog of up to a whole pipe (after a
/// handover, or a keter started again) arrives in one burst, far faster than the writer
/// writes, and its lines past the app's share of the queue would be dropped.
const MIN_ROOM: usize = QUEUE_LINES / 4;
/// How often a pipe held back for want of room is looked at again, in milliseconds.
const HELD_RECHECK_MS: u16 = 10;

enum Watched {
    Output {
        pipe: File,
        log: AppLog,
        /// The start of a line whose newline has not arrived yet.
        partial: Vec<u8>,
        /// The pipe's inode, its name in systemd's store.
        ino: u64,
    },
    Exit {
        pidfd: OwnedFd,
        pid: i32,
        /// Keter's child: its status is reaped here.
        child: bool,
        on_exit: OnExit,
    },
}

/// Whether the thread runs, and the handover's request to stop it.
#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: bool,
}

struct Watch {
    epoll: Epoll,
    entries: Mutex<HashMap<u64, Watched>>,
    next_token: AtomicU64,
    wake: EventFd,
    pause: Mutex<PauseState>,
    changed: Condvar,
}

/// Reads `pipe` line by line into `log` until every writer has closed it.
pub fn output(pipe: File, log: AppLog) -> io::Result<()> {
    output_continued(pipe, log, Vec::new())
}

/// [`output`] of a pipe that an earlier keter already read from: `partial` is the start of a
/// line it had read and not logged yet.
pub fn output_continued(pipe: File, log: AppLog, partial: Vec<u8>) -> io::Result<()> {
    set_nonblocking(&pipe)?;
    let fd = pipe.as_raw_fd();
    let ino = pipe.metadata()?.ino();
    crate::systemd::keep_pipe(ino, pipe.as_fd());
    watch()?.add(
        fd,
        Watched::Output {
            pipe,
            log,
            partial,
            ino,
        },
    )
}

/// Learns of the exit of process `pid`, known by `pidfd`, and then calls `on_exit`. A child of
/// keter's is reaped here; the caller has made sure that `pidfd` refers to the process it
/// means (for a process of an earlier keter, by its start time).
pub fn exit(pid: i32, pidfd: OwnedFd, on_exit: OnExit) -> io::Result<()> {
    let child = crate::procfs::parent_of(pid) == Some(std::process::id() as i32);
    let fd = pidfd.as_raw_fd();
    watch()?.add(
        fd,
        Watched::Exit {
            pidfd,
            pid,
            child,
            on_exit,
        },
    )
}

/// What the watch thread held when it was paused.
pub struct Paused {
    watch: &'static Arc<Watch>,
}

/// One output pipe as the paused thread held it.
pub struct HeldPipe {
    /// Inode of the pipe, which names it across keters.
    pub ino: u64,
    pub fd: i32,
    /// The start of a line not logged yet.
    pub partial: Vec<u8>,
}

/// Stops the watch thread (no more output read, no more exits reported) until the returned
/// guard is dropped. For an in-place upgrade: what arrives meanwhile waits in the pipes and as
/// exited processes for the next keter.
pub fn pause() -> io::Result<Paused> {
    let watch = watch()?;
    let mut st = watch.pause_lock();
    st.requested = true;
    // Cannot fail but by overflowing the counter, which the watch thread resets.
    let _ = watch.wake.write(1);
    while !st.parked {
        st = watch.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    Ok(Paused { watch })
}

impl Paused {
    /// The output pipes held, each with what it had read of an unfinished line.
    pub fn pipes(&self) -> Vec<HeldPipe> {
        self.watch
            .lock()
            .values()
            .filter_map(|w| match w {
                Watched::Output {
                    pipe, partial, ino, ..
                } => Some(HeldPipe {
                    ino: *ino,
                    fd: pipe.as_raw_fd(),
                    partial: partial.clone(),
                }),
                Watched::Exit { .. } => None,
            })
            .collect()
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let mut st = self.watch.pause_lock();
        st.requested = false;
        self.watch.changed.notify_all();
        while st.parked {
            st = self
                .watch
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn watch() -> io::Result<&'static Arc<Watch>> {
    static WATCH: OnceLock<io::Result<Arc<Watch>>> = OnceLock::new();
    WATCH
        .get_or_init(|| {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
            epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
            let w = Arc::new(Watch {
                epoll,
                entries: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(WAKE + 1),
                wake,
                pause: Mutex::new(PauseState::default()),
                changed: Condvar::new(),
            });
            let thread_side = w.clone();
            std::thread::Builder::new()
                .name("child-watch".into())
                .spawn(move || thread_side.run())?;
            Ok(w)
        })
        .as_ref()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the process watch thread did not start: {e}"),
            )
        })
}

impl Watch {
    fn add(&self, fd: i32, entry: Watched) -> io::Result<()> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        // In the map before it is in the epoll set: the thread must find every token it sees.
        self.lock().insert(token, entry);
        // SAFETY: `fd` belongs to the entry just stored; only the watch thread removes
        // entries, and only after this registration has reported an event.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let added = self
            .epoll
            .add(borrowed, EpollEvent::new(EpollFlags::EPOLLIN, token));
        if let Err(e) = added {
            self.lock().remove(&token);
            return Err(io::Error::from(e));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Watched>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pause_lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut buf = vec![0u8; READ_PER_TURN];
        // Pipes out of the epoll set until their app's log has room again.
        let mut held = Vec::new();
        loop {
            let timeout = if held.is_empty() {
                EpollTimeout::NONE
            } else {
                EpollTimeout::from(HELD_RECHECK_MS)
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waiting for app processes failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
            };
            // A pause comes before anything else in the batch: from the moment it is asked
            // for, nothing more is read or reported.
            if events[..n].iter().any(|e| e.data() == WAKE) {
                self.park();
            }
            for ev in &events[..n] {
                if ev.data() != WAKE {
                    self.ready(ev.data(), &mut buf, &mut held);
                }
            }
            self.release(&mut held);
        }
    }

    /// Puts back in the epoll set the held pipes whose app has room again.
    fn release(&self, held: &mut Vec<u64>) {
        if held.is_empty() {
            return;
        }
        let entries = self.lock();
        held.retain(|token| {
            let Some(Watched::Output { pipe, log, .. }) = entries.get(token) else {
                return false;
            };
            if log.room() < QUEUE_LINES / 2 && !nearly_full(pipe) {
                return true;
            }
            let event = EpollEvent::new(EpollFlags::EPOLLIN, *token);
            if let Err(e) = self.epoll.add(pipe.as_fd(), event) {
                log::error!("cannot watch an app's output pipe again: {e}");
            }
            false
        });
    }

    /// Waits while a pause is asked for.
    fn park(&self) {
        // Resets the counter; nothing to read (EAGAIN) is as good.
        let _ = self.wake.read();
        let mut st = self.pause_lock();
        if !st.requested {
            return;
        }
        st.parked = true;
        self.changed.notify_all();
        while st.requested {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked = false;
        self.changed.notify_all();
    }

    fn ready(&self, token: u64, buf: &mut [u8], held: &mut Vec<u64>) {
        if self.pause_lock().requested {
            return; // level-triggered: it comes back after the pause
        }
        let mut entries = self.lock();
        match entries.get_mut(&token) {
            Some(Watched::Output {
                pipe, log, partial, ..
            }) => {
                // A pipe about to fill is read whatever the room: the app must never block on
                // its output because the disk is slow (what does not fit is dropped, counted).
                let room = log.room();
                let limit = if room >= MIN_ROOM {
                    room.min(buf.len())
                } else if nearly_full(pipe) {
                    buf.len()
                } else {
                    if self.epoll.delete(pipe.as_fd()).is_ok() {
                        held.push(token);
                    }
                    return;
                };
                if read_lines(pipe, log, partial, &mut buf[..limit]) {
                    return;
                }
                if let Some(Watched::Output { pipe, ino, .. }) = entries.remove(&token) {
                    let _ = self.epoll.delete(pipe.as_fd());
                    crate::systemd::forget_pipe(ino);
                }
            }
            Some(Watched::Exit { .. }) => {
                let Some(Watched::Exit {
                    pidfd,
                    pid,
                    child,
                    on_exit,
                }) = entries.remove(&token)
                else {
                    return;
                };
                drop(entries);
                let _ = self.epoll.delete(pidfd.as_fd());
                // The pidfd is readable: the process has exited and `waitpid` returns at once.
                let status = if child { reap(pid) } else { None };
                on_exit(pid, status);
            }
            None => {}
        }
    }
}

/// Reaps child `pid`, which has exited; `None` if it cannot be reaped (no longer a child).
pub fn reap(pid: i32) -> Option<ExitStatus> {
    use nix::sys::wait::{WaitStatus, waitpid};
    loop {
        // Without WNOHANG or WUNTRACED, only an exit or a death by a signal is reported.
        return match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, signal, core)) => Some(ExitStatus::from_raw(
                signal as i32 | if core { 0x80 } else { 0 },
            )),
            Err(Errno::EINTR) => continue,
            _ => None,
        };
    }
}

/// Reads what `pipe` has and logs every complete line; returns false at end of file (after
/// logging an unfinished last line).
fn read_lines(pipe: &mut File, log: &AppLog, partial: &mut Vec<u8>, buf: &mut [u8]) -> bool {
    loop {
        match pipe.read(buf) {
            Ok(0) => {
                if !partial.is_empty() {
                    log_line(log, partial);
                    *partial = Vec::new();
                }
                return false;
            }
            Ok(n) => {
                // Whatever more is waiting comes at the next wake-up (the set is
                // level-triggered), after the other pipes had their turn.
                split_lines(log, partial, &buf[..n]);
                return true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Appends `data` to `partial` and logs every complete line; a line longer than [`MAX_LINE`]
/// is cut into pieces of that length (a binary blob on stdout has no newlines).
fn split_lines(log: &AppLog, partial: &mut Vec<u8>, mut data: &[u8]) {
    while !data.is_empty() {
        let room = MAX_LINE - partial.len();
        let window = &data[..data.len().min(room)];
        match window.iter().position(|b| *b == b'\n') {
            Some(i) => {
                let line = &window[..i];
                if partial.is_empty() {
                    log_line(log, line);
                } else {
                    partial.extend_from_slice(line);
                    log_line(log, partial);
                    partial.clear();
                }
                data = &data[i + 1..];
            }
            None if window.len() == room => {
                partial.extend_from_slice(window);
                log_line(log, partial);
                partial.clear();
                data = &data[room..];
            }
            None => {
                partial.extend_from_slice(window);
                data = &[];
            }
        }
    }
    // A long partial line keeps its buffer; an empty one gives it back.
    if partial.is_empty() && partial.capacity() > 4096 {
        *partial = Vec::new();
    }
}

/// Where an app's bytes become a line: invalid UTF-8 becomes U+FFFD here, and
/// [`AppLog::line`] writes out the control characters (NUL, ESC, C1...), so that whatever
/// reads the log (its file, keter's stderr and the journal, the status interface, a readiness
/// failure's message) gets printable text.
fn log_line(log: &AppLog, mut line: &[u8]) {
    while let [rest @ .., b'\r' | b'\n'] = line {
        line = rest;
    }
    log.line(&String::from_utf8_lossy(line));
}

/// Whether `pipe` is fifteen sixteenths full or more (its writer blocks when it is full).
fn nearly_full(pipe: &File) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points to a live c_int; the
    // descriptor is borrowed from `pipe` for the call. nix has no safe wrapper for it.
    let r = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut queued) };
    let size = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
    r == 0 && size > 0 && queued >= size - size / 16
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A descriptor that becomes readable when process `pid` exits (Linux 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; on success it returns a new descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::applog::LogTarget;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let log = AppLog::open(LogTarget::Stderr("t".into())).unwrap();
        let mut partial = Vec::new();
        for c in chunks {
            split_lines(&log, &mut partial, c);
        }
        log.tail(100)
            .into_iter()
            .map(|l| l.split_once(' ').unwrap().1.to_string())
            .collect()
    }

    /// What an app printed while no keter read it (a handover, a keter started again) waits
    /// in its pipe, many times its share of the log writer's queue: all of it is written.
    #[test]
    fn a_backlog_in_the_pipe_reaches_the_log_without_a_drop() {
        let dir = std::env::temp_dir().join(format!("keter-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app-b.log");
        let log = AppLog::open(LogTarget::File {
            path: path.clone(),
            max_bytes: 1 << 30,
            keep: 1,
        })
        .unwrap();
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let set = nix::fcntl::fcntl(&read_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        assert!(set.unwrap() >= 1 << 20);
        let (read_end, mut write_end) = (File::from(read_end), File::from(write_end));
        let lines = 10 * QUEUE_LINES;
        let text: String = (0..lines).map(|i| format!("l {i}\n")).collect();
        assert!(text.len() < (1 << 20) / 2);
        std::io::Write::write_all(&mut write_end, text.as_bytes()).unwrap();
        drop(write_end);
        output(read_end, log.clone()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let written = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= lines || log.dropped() > 0 {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "lines never written");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(log.dropped(), 0, "lines were dropped");
        let numbers: Vec<usize> = written
            .lines()
            .map(|l| l.split_once(" l ").unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(numbers, (0..lines).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An app's bytes as it may print them, NUL and escape sequences included, become
    /// printable lines.
    #[test]
    fn escape_sequences_and_nul_never_reach_a_line() {
        let got = lines(&[
            b"\x1b]52;c;ZXZpbA==\x07\x1b[2J\0<3>forged\n",
            b"a\xc2\x9b2J\xff\n",
        ]);
        assert_eq!(
            got,
            [
                "\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J\\x00<3>forged",
                "a\\x9b2J\u{fffd}"
            ]
        );
    }

    #[test]
    fn lines_across_reads_and_cut_at_the_limit() {
        assert_eq!(lines(&[b"a\nb", b"c\r\n", b"\n"]), ["a", "bc", ""]);
        let long = vec![b'x'; MAX_LINE + 3];
        let got = lines(&[&long[..10], &long[10..], b"\n"]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(got[1], "xxx");
    }
}
