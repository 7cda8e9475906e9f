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
        // Nginx's bursts wait here rather than in the kernel's short queue of datagrams.
        let _ =
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        socket.set_read_timeout(Some(Duration::from_millis(250)))?;
        queue_length_check();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("requests".into())
            .spawn(move || read(socket, &requests, &accept, &stopped))?;
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

/// The kernel queues at most `net.unix.max_dgram_qlen` datagrams on the socket; beyond that
/// Nginx's send fails, and Nginx logs a warning for that request (`send() to syslog failed`).
/// systemd sets 512 (`sysctl.d/50-default.conf`); the kernel's own default, 10, drops datagrams
/// whenever keter's thread is not scheduled for a moment under load.
fn queue_length_check() {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/unix/max_dgram_qlen") else {
        return;
    };
    if let Ok(n) = text.trim().parse::<u32>()
        && n < 128
    {
        log::warn!(
            "keter: request metrics: net.unix.max_dgram_qlen is {n}: under load Nginx will drop \
             datagrams keter has not read yet, and warn for each (README, \"Request metrics\"); \
             systemd sets 512"
        );
    }
}

fn read(socket: UnixDatagram, requests: &Requests, accept: &Accept, stop: &AtomicBool) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg};
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(UnixCredentials);
    let fd = socket.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let (len, uid) = match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
            Ok(msg) => {
                let uid = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmCredentials(c) => Some(c.uid()),
                        _ => None,
                    })
                });
                (msg.bytes, uid)
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("keter: request metrics: cannot read Nginx's datagrams: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        requests.datagrams.fetch_add(1, Ordering::Relaxed);
        if !uid.is_some_and(accept) {
            requests.dropped(Dropped::Refused);
            continue;
        }
        let counted = match Line::parse(&buf[..len]) {
            Some(line) => requests.add(unix_now(), &line),
            None => Err(Dropped::Malformed),
        };
        if let Err(why) = counted {
            requests.dropped(why);
        }
    }
}
