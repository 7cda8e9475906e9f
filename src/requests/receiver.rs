//! The thread that reads Nginx's datagrams (README, "Request metrics").
//!
//! The socket is a unix datagram socket, `ROOT/nginx/worker-files/requests.sock`: that folder
//! is searched only by keter's user and Nginx's workers' group (`src/nginx/worker_files.rs`),
//! and the socket is mode 0620 (keter reads, the workers' group writes), so an app running as
//! another user cannot reach it. Every datagram also carries its sender's credentials
//! (`SO_PASSCRED`, filled in by the kernel): one from a user the caller refuses (an app's) is
//! dropped and counted, never counted as a request.
//!
//! Nginx sends without waiting: when this thread cannot keep up (or is stopped), the socket's
//! queue fills and the kernel drops what Nginx sends next (Nginx's send fails with EAGAIN and
//! it goes on serving). Those losses are not visible to keter; what it can see (datagrams
//! refused, malformed, of too many apps) is counted.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Dropped, Line, Requests, unix_now};

/// Decides from a datagram's sender uid whether it is counted.
pub type Accept = Box<dyn Fn(u32) -> bool + Send>;

/// The running receiver; [`Receiver::stop`] ends it.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// The largest datagram read: a line is about 80 bytes plus the app name.
const MAX_DATAGRAM: usize = 2048;

impl Receiver {
    /// Binds `path` (replacing a stale socket of an earlier run) and starts reading into
    /// `requests`, counting datagrams whose sender's uid `accept` refuses as refused.
    pub fn start(path: &Path, requests: Arc<Requests>, accept: Accept) -> io::Result<Receiver> {
        if let Some(parent) = path.parent() {
            // As `src/nginx/worker_files.rs` makes it: searched by the workers' group only.
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o710,
            )
            .create(parent)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path)?
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(_) => {}
        }
        let socket = UnixDatagram::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o620))?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(io::Error::from)?;
        // The thread wakes this often to see whether to stop.
        socket.set_read_timeout(Some(Duration::from_millis(250)))?;
        let pace = Pace::new(queue_length());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("requests".into())
            .spawn(move || read(socket, &requests, &accept, &stopped, pace))?;
        Ok(Receiver {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// Stops reading and removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The kernel queues at most `net.unix.max_dgram_qlen` datagrams on the socket (of the
/// network namespace keter started in); beyond that Nginx's send fails, and Nginx logs a warning
/// for that request (`send() to syslog failed`). systemd sets 512 (`sysctl.d/50-default.conf`);
/// the kernel's own default, 10, drops datagrams whenever keter's thread is not scheduled for a
/// moment under load. (The socket's receive buffer plays no part: a unix datagram waiting to be
/// read is charged to its sender's send buffer.) `None` when it cannot be read.
fn queue_length() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen").ok()?;
    let n = text.trim().parse::<u32>().ok()?;
    if n < 128 {
        log::warn!(
            "keter: request metrics: net.unix.max_dgram_qlen is {n}: under load Nginx will drop \
             datagrams keter has not read yet, and warn for each (README, \"Request metrics\"); \
             systemd sets 512"
        );
    }
    Some(n)
}

/// How long the thread waits, after reading what was queued, before it reads again: under load
/// it then reads datagrams in batches instead of being woken by each (a wake-up per request
/// costs Nginx's worker, which does the waking, and keter a system call and a switch per
/// request). The wait adapts to what the last read found: it doubles (from 50 µs, up to 1 ms)
/// while the queue held less than a sixteenth of what the kernel allows, and halves when it
/// held more than a quarter, so the queue keeps room for a moment when the thread is not
/// scheduled. With a short queue (below 64, the kernel's default is 10) the thread never waits:
/// any wait would fill it.
struct Pace {
    queue_length: usize,
    wait: Duration,
}

impl Pace {
    const MIN: Duration = Duration::from_micros(50);
    const MAX: Duration = Duration::from_millis(1);

    fn new(queue_length: Option<u32>) -> Pace {
        Pace {
            queue_length: queue_length.unwrap_or(0) as usize,
            wait: Duration::ZERO,
        }
    }

    /// The wait after a read that found `read` datagrams queued.
    fn after(&mut self, read: usize) -> Duration {
        if self.queue_length < 64 {
            return Duration::ZERO;
        }
        if read > self.queue_length / 4 {
            self.wait /= 2;
            if self.wait < Pace::MIN {
                self.wait = Duration::ZERO;
            }
        } else if read < self.queue_length / 16 {
            self.wait = (self.wait * 2).clamp(Pace::MIN, Pace::MAX);
        }
        self.wait
    }
}

/// Datagrams read by one `recvmmsg`.
const BATCH: usize = 64;

fn read(
    socket: UnixDatagram,
    requests: &Requests,
    accept: &Accept,
    stop: &AtomicBool,
    mut pace: Pace,
) {
    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, MultiHeaders, UnixCredentials, recvmmsg,
    };
    let mut buf = vec![0u8; BATCH * MAX_DATAGRAM];
    let mut headers: MultiHeaders<()> =
        MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(UnixCredentials)));
    let mut got: Vec<(usize, Option<u32>)> = Vec::with_capacity(BATCH);
    let fd = socket.as_raw_fd();
    // Datagrams read since the last wait.
    let mut read = 0;
    while !stop.load(Ordering::Relaxed) {
        // Blocks until a datagram is queued (or the read timeout, to see whether to stop), then
        // takes what else is queued, up to a batch, in the same system call.
        got.clear();
        let received = {
            let mut iovs: Vec<[io::IoSliceMut; 1]> = buf
                .chunks_mut(MAX_DATAGRAM)
                .map(|c| [io::IoSliceMut::new(c)])
                .collect();
            recvmmsg(
                fd,
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            )
            .map(|msgs| {
                for msg in msgs {
                    let uid = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::ScmCredentials(c) => Some(c.uid()),
                            _ => None,
                        })
                    });
                    got.push((msg.bytes, uid));
                }
            })
        };
        match received {
            Ok(()) => {}
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                read = 0;
                continue;
            }
            Err(e) => {
                log::error!("keter: request metrics: cannot read Nginx's datagrams: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        }
        read += got.len();
        let now = unix_now();
        for (i, &(len, uid)) in got.iter().enumerate() {
            requests.datagrams.fetch_add(1, Ordering::Relaxed);
            if !uid.is_some_and(accept) {
                requests.dropped(Dropped::Refused);
                continue;
            }
            let datagram = &buf[i * MAX_DATAGRAM..][..len.min(MAX_DATAGRAM)];
            let counted = match Line::parse(datagram) {
                Some(line) => requests.add(now, &line),
                None => Err(Dropped::Malformed),
            };
            if let Err(why) = counted {
                requests.dropped(why);
            }
        }
        if got.len() == BATCH {
            // More may be queued: read on before waiting.
            continue;
        }
        let wait = pace.after(read);
        read = 0;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_keeps_the_queue_a_quarter_full_at_most() {
        // The kernel's default queue: never a wait.
        let mut p = Pace::new(Some(10));
        assert_eq!(p.after(0), Duration::ZERO);
        assert_eq!(p.after(1), Duration::ZERO);
        assert_eq!(Pace::new(None).after(1), Duration::ZERO);
        // systemd's 512: waits grow while little was queued, up to 1 ms.
        let mut p = Pace::new(Some(512));
        assert_eq!(p.after(1), Duration::from_micros(50));
        assert_eq!(p.after(1), Duration::from_micros(100));
        for _ in 0..10 {
            p.after(1);
        }
        assert_eq!(p.after(1), Pace::MAX);
        // Between a sixteenth and a quarter: the wait stays.
        assert_eq!(p.after(100), Pace::MAX);
        // More than a quarter: it halves, down to none.
        assert_eq!(p.after(200), Duration::from_micros(500));
        for _ in 0..5 {
            p.after(512);
        }
        assert_eq!(p.after(512), Duration::ZERO);
    }
}
