//! The control socket's server: a thread that accepts connections on `ROOT/control.sock`,
//! checks each peer (`access.rs`), reads one request, hands it to the daemon's loop and
//! writes the answer that comes back. Each connection has a thread of its own (a restart
//! waits for its switch); at most [`MAX_CONNECTIONS`] at once, and a request must arrive
//! within [`REQUEST_TIME`]. Only root and the deployers can connect at all (the socket's mode
//! and group), so this is no door for anyone else.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::access::{self, Incoming, Peer, Verdict};
use super::{Answer, Asked, Request};
use crate::app::{Refusal, Reply};
use crate::daemon::Input;
use crate::isolation::Isolation;
use crate::report::Reports;

/// Connections served at once; more are answered with a refusal.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a connection may take to send its request.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);
/// The longest a request's answer is waited for (a restart waits for its readiness and
/// switch); after it the asker is told that it is still under way.
pub const ANSWER_TIME: Duration = Duration::from_secs(600);
/// The largest request read.
const MAX_REQUEST: u64 = 64 << 10;

/// The running control socket; [`ControlServer::stop`] ends it.
pub struct ControlServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the connections' threads need.
struct Context {
    tx: Sender<Input>,
    isolation: Arc<Isolation>,
    reports: Arc<Reports>,
    incoming: PathBuf,
    open: AtomicUsize,
}

impl ControlServer {
    /// Binds `ROOT/control.sock` and serves it on a thread of its own. A socket that cannot
    /// be bound is logged and keter runs without one (the apps matter more).
    pub fn start(
        root: &Path,
        tx: Sender<Input>,
        isolation: Arc<Isolation>,
        reports: Arc<Reports>,
    ) -> Option<ControlServer> {
        let path = super::socket_path(root);
        let incoming = root.join("incoming");
        let listener = match bind(&path, &incoming) {
            Ok(l) => l,
            Err(e) => {
                log::error!(
                    "keter: cannot serve the control socket {}: {e}; keter restart and the other \
                     commands that ask the daemon will not reach it",
                    path.display()
                );
                return None;
            }
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let context = Arc::new(Context {
            tx,
            isolation,
            reports,
            incoming,
            open: AtomicUsize::new(0),
        });
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, context, stop));
        match thread {
            Ok(t) => {
                log::info!("keter: control socket on {}", path.display());
                Some(ControlServer {
                    path,
                    stopping,
                    thread: Some(t),
                })
            }
            Err(e) => {
                log::error!("keter: the control socket cannot run: no thread: {e}");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stops accepting, removes the socket and waits for the accepting thread (connections
    /// still being answered end with the daemon).
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket: a stale one left by a keter that was killed is replaced, never one a
/// live process answers on, nor a file that is not a socket. Mode 0660, group of
/// `incoming/` (as root; otherwise keter's own).
fn bind(path: &Path, incoming: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process answers on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if nix::unistd::geteuid().is_root()
        && let Ok(meta) = std::fs::metadata(incoming)
    {
        // Only root writes ROOT, so the path is the socket just bound.
        std::os::unix::fs::lchown(path, Some(0), Some(meta.gid()))?;
    }
    Ok(listener)
}

fn accept_loop(listener: UnixListener, context: Arc<Context>, stopping: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("keter: control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if context.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            context.open.fetch_sub(1, Ordering::SeqCst);
            let _ = refuse(&stream, "keter's control socket is busy; try again");
            continue;
        }
        let c = context.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve(stream, &c);
                c.open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            context.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn refuse(mut stream: &UnixStream, why: &str) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    write_answer(
        &mut stream,
        &Answer::of(Err(Refusal::Refused(why.to_string()))),
    )
}

fn write_answer(stream: &mut impl Write, answer: &Answer) -> io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// One connection: who it is, its request, the daemon's answer.
fn serve(stream: UnixStream, c: &Context) {
    let peer = match peer_of(&stream) {
        Ok(p) => p,
        Err(e) => {
            let _ = refuse(&stream, &format!("keter cannot tell who connected: {e}"));
            return;
        }
    };
    let verdict = judge(&peer, c);
    let as_what = match verdict {
        Verdict::Allowed(what) => what,
        Verdict::Refused(why) => {
            // Only root and the socket's group can connect at all: every refusal is logged.
            log::warn!("keter: the control socket refused uid {}: {why}", peer.uid);
            let _ = refuse(&stream, &why);
            return;
        }
    };
    let _ = stream.set_read_timeout(Some(REQUEST_TIME));
    let mut line = String::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
    let request: Request = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_str(line.trim_end()).map_err(|e| format!("not a request: {e}"))
    }) {
        Ok(r) => r,
        Err(why) => {
            let _ = refuse(&stream, &why);
            return;
        }
    };
    log::info!(
        "keter: uid {} ({as_what}) asks: {}",
        peer.uid,
        request.describe()
    );
    if let Request::Releases { app } = &request {
        let answer = releases_of(&c.reports, app);
        let mut s = &stream;
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = write_answer(&mut s, &answer);
        return;
    }
    let (reply, answered) = Reply::channel();
    let asked = Asked {
        request: request.clone(),
        uid: peer.uid,
        reply,
    };
    let answer = if c.tx.send(Input::Ask(Box::new(asked))).is_err() {
        Answer::of(Err(Refusal::Stopping))
    } else {
        match answered.recv_timeout(ANSWER_TIME) {
            Ok(outcome) => Answer::of(outcome),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                Answer::of(Err(Refusal::UnderWay {
                    app: request.app().to_string(),
                    after: ANSWER_TIME,
                }))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Answer::of(Err(Refusal::Dropped {
                    app: request.app().to_string(),
                }))
            }
        }
    };
    log::info!(
        "keter: uid {}: {}: {}",
        peer.uid,
        request.describe(),
        if answer.ok { "done" } else { "not done" }
    );
    let mut s = &stream;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = write_answer(&mut s, &answer);
}

/// The releases of `app` as its worker last published them.
fn releases_of(reports: &Reports, app: &str) -> Answer {
    let Some(report) = crate::names::AppName::new(app)
        .ok()
        .and_then(|a| reports.app(a.as_str()))
    else {
        return Answer::of(Err(Refusal::NoSuchApp {
            app: app.to_string(),
        }));
    };
    let mut answer = Answer::of(Ok(format!(
        "{app}: {} releases, {} bytes kept",
        report.releases.len(),
        report.releases_bytes
    )));
    answer.data = Some(serde_json::json!({
        "app": report.name,
        "releases": report.releases,
        "releases_bytes": report.releases_bytes,
    }));
    answer
}

fn judge(peer: &Peer, c: &Context) -> Verdict {
    let incoming = std::fs::metadata(&c.incoming).ok().map(|m| Incoming {
        uid: m.uid(),
        gid: m.gid(),
        mode: m.mode(),
    });
    let group_name = incoming
        .and_then(|i| nix::unistd::Group::from_gid(i.gid.into()).ok().flatten())
        .map(|g| g.name)
        .unwrap_or_else(|| "of incoming/".to_string());
    access::judge(
        peer,
        nix::unistd::geteuid().as_raw(),
        c.isolation.app_of_uid(peer.uid),
        incoming,
        &group_name,
    )
}

/// Linux's `SO_PEERGROUPS` (the connecting process's supplementary groups), which the libc
/// crate does not name for this target.
const SO_PEERGROUPS: libc::c_int = 59;

/// The peer's uid and gid (`SO_PEERCRED`) and groups (`SO_PEERGROUPS`).
fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the buffer is `len` bytes long and lives across the call.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    })
}
