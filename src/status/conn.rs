//! The status interface's connections (README, "Status interface"): who is answered, how many
//! at once, and how long a connection may idle. An idle connection holds one of keter's
//! descriptors, the same descriptors that app workers, pipes and bundles need, so nobody
//! may hold them at will:
//!
//! * the peer is known as soon as a connection is accepted ([`Peer`]), and a peer that is
//!   refused (an app, Nginx's workers) gets its 403 at once, before anything is read, and the
//!   connection is closed after a short linger; only a few refusals are under way at once;
//! * a connection must send its request head within [`Limits::head_timeout`] of its accept,
//!   and the next one within as long of the previous answer (keep-alive), or it is closed;
//! * at most [`Limits::connections`] connections are served at once, at most
//!   [`Limits::per_peer`] of them from one peer (a uid, or another machine's address), so
//!   that one local user cannot crowd out the operators; a connection beyond either is closed
//!   at once.
//!
//! Requests are served by hyper's HTTP/1.1 server with the axum router of `server.rs`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::peer::{Peer, PeerKey};

/// How long a connection may wait and how many there may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest a connection may take to send a request head, counted from its accept or,
    /// on a kept-alive connection, from the end of the previous answer.
    pub head_timeout: Duration,
    /// Connections served at once; one more is closed at once.
    pub connections: usize,
    /// Connections served at once from one peer; one more is closed at once.
    pub per_peer: usize,
    /// Refused connections being told why at once; more are closed without a word.
    pub refusing: usize,
    /// How long a refused connection is kept open to read and drop what the peer sent, so
    /// that its 403 is read instead of lost to a reset.
    pub refusal_linger: Duration,
}

impl Limits {
    /// The limits of the status interface: far more than operators, a browser (six
    /// connections) and a metrics scraper need, far fewer than keter's descriptors.
    pub const DEFAULT: Limits = Limits {
        head_timeout: Duration::from_secs(10),
        connections: 256,
        per_peer: 32,
        refusing: 64,
        refusal_linger: Duration::from_secs(1),
    };
}

/// How a peer reached the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Unix,
}

/// Decides from the peer alone whether a connection is refused: `Some(why)` is the text of
/// its 403.
pub type Refuse = dyn Fn(&Peer, Via) -> Option<String> + Send + Sync;

/// A bound listener of the status interface.
pub enum Listening {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A connection just accepted.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Listening {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listening::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
            Listening::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// What every connection's task shares.
struct Shared {
    router: Router,
    refuse: Arc<Refuse>,
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
    refusing: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
}

/// Serves `router` on `listening` until `stopped` turns true, then gives the open
/// connections `grace` to finish their requests. Returns false when some were still open
/// (they are dropped with the runtime).
pub async fn serve(
    listening: Listening,
    router: Router,
    refuse: Arc<Refuse>,
    limits: Limits,
    stopped: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let shared = Shared {
        router,
        refuse,
        limits,
        counts: Arc::new(Mutex::new(Counts::default())),
        refusing: Arc::new(Semaphore::new(limits.refusing)),
        stopped: stopped.clone(),
    };
    let mut stop = stopped;
    let mut reported = false;
    loop {
        let accepted = tokio::select! {
            a = listening.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                let peer = Peer::of_tcp(&s);
                admit(s, peer, Via::Tcp, &shared);
            }
            Ok(Accepted::Unix(s)) => {
                let peer = Peer::of_unix(&s);
                admit(s, peer, Via::Unix, &shared);
            }
            // The peer gave up before the accept: nothing to do.
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Out of descriptors, say: the connection waits in the backlog meanwhile.
                if !reported {
                    log::error!(
                        "keter: the status interface cannot accept a connection: {e}; it tries \
                         again every 100 ms"
                    );
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    while lock(&shared.counts).total > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Refuses the connection, closes it at once, or serves it on a task of its own.
fn admit<S>(stream: S, peer: Peer, via: Via, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Some(why) = (shared.refuse)(&peer, via) {
        if let Ok(permit) = shared.refusing.clone().try_acquire_owned() {
            tokio::spawn(refuse(stream, why, shared.limits.refusal_linger, permit));
        }
        return;
    }
    let Some(slot) = Slot::take(&shared.counts, &peer, &shared.limits) else {
        return;
    };
    let service = TowerToHyperService::new(shared.router.clone());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.head_timeout);
    let mut stopped = shared.stopped.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stopped.wait_for(|s| *s) => {}
        }
        // keter stops: the request under way is answered, an idle connection is closed.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    });
}

/// Answers 403 with `why` before reading anything, then reads and drops what the peer sends
/// for a moment (closing a socket with unread data would reset the connection, and the peer
/// might lose the answer to the reset).
async fn refuse<S>(mut stream: S, why: String, linger: Duration, _permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let body = format!("{why}\n");
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\nx-content-type-options: nosniff\r\n\
         cache-control: no-store\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(linger, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

/// The connections being served, in all and per peer.
#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<PeerKey, usize>,
    /// Peers whose connections were closed for the limit, logged once each.
    logged: HashSet<PeerKey>,
    logged_total: bool,
}

/// Most peers logged for the limit: another machine's addresses could be many.
const LOGGED_PEERS: usize = 1024;

fn lock(counts: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    counts.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection counted; dropping it counts it out.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    key: PeerKey,
}

impl Slot {
    /// Counts a connection of `peer` in, or `None` when a limit is reached (logged once per
    /// peer, and once for the total).
    fn take(counts: &Arc<Mutex<Counts>>, peer: &Peer, limits: &Limits) -> Option<Slot> {
        let key = peer.key();
        let mut c = lock(counts);
        let held = c.per_peer.get(&key).copied().unwrap_or(0);
        if c.total >= limits.connections {
            if !c.logged_total {
                c.logged_total = true;
                log::warn!(
                    "keter: the status interface serves {} connections, the most it serves at \
                     once: new ones are closed until some end",
                    c.total
                );
            }
            return None;
        }
        if held >= limits.per_peer {
            if c.logged.len() < LOGGED_PEERS && c.logged.insert(key) {
                log::warn!(
                    "keter: the status interface closed a connection {} at once: that peer \
                     holds {held} connections already, the most one peer may",
                    describe(peer)
                );
            }
            return None;
        }
        c.total += 1;
        *c.per_peer.entry(key.clone()).or_insert(0) += 1;
        Some(Slot {
            counts: counts.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_peer.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.key);
            }
        }
    }
}

fn describe(peer: &Peer) -> String {
    match peer {
        Peer::Uid(uid) => format!("of uid {uid}"),
        Peer::Remote(a) => format!("from {}", a.ip()),
        Peer::Unknown(_) => "of an unknown peer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    const SHORT: Limits = Limits {
        head_timeout: Duration::from_millis(300),
        connections: 6,
        per_peer: 4,
        refusing: 2,
        refusal_linger: Duration::from_millis(200),
    };

    /// A server on a unix socket in a thread of its own; the peer is this test's own uid.
    struct Server {
        path: std::path::PathBuf,
        stop: watch::Sender<bool>,
        thread: Option<std::thread::JoinHandle<bool>>,
    }

    impl Server {
        fn start(label: &str, limits: Limits, refuse: Arc<Refuse>) -> Server {
            let dir =
                std::env::temp_dir().join(format!("keter-conn-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("s.sock");
            let (stop, stopped) = watch::channel(false);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let listener = runtime
                .block_on(async { tokio::net::UnixListener::bind(&path) })
                .unwrap();
            let router = Router::new().route("/", axum::routing::get(|| async { "answered" }));
            let thread = std::thread::spawn(move || {
                runtime.block_on(serve(
                    Listening::Unix(listener),
                    router,
                    refuse,
                    limits,
                    stopped,
                    Duration::from_millis(500),
                ))
            });
            Server {
                path,
                stop,
                thread: Some(thread),
            }
        }

        fn connect(&self) -> UnixStream {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        }

        fn stop(mut self) -> bool {
            let _ = self.stop.send(true);
            let all_ended = self.thread.take().unwrap().join().unwrap();
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
            all_ended
        }
    }

    /// Sends a GET and reads the answer to the end of the connection (the request asks to
    /// close it).
    fn get(s: &mut UnixStream) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// True once the server has closed `s` (it reads end of file).
    fn closed(s: &mut UnixStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(0))
    }

    fn nobody_refused() -> Arc<Refuse> {
        Arc::new(|_: &Peer, _: Via| None)
    }

    #[test]
    fn idle_connections_are_closed_after_the_head_timeout() {
        let server = Server::start("idle", SHORT, nobody_refused());
        let started = Instant::now();
        let mut idle = server.connect();
        assert!(closed(&mut idle), "an idle connection stayed open");
        assert!(started.elapsed() >= SHORT.head_timeout);
        // Half a head, then nothing: closed as well.
        let mut slow = server.connect();
        slow.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
        assert!(closed(&mut slow));
        // A kept-alive connection gets its answer, then is closed once idle for as long.
        let mut kept = server.connect();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: k\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = kept.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("answered"));
        assert!(closed(&mut kept));
        assert!(server.stop());
    }

    #[test]
    fn connections_beyond_the_limits_are_closed_at_once() {
        let server = Server::start("limits", SHORT, nobody_refused());
        // One peer (this test's uid) holds its share; the next is closed without an answer,
        // long before the head timeout.
        let held: Vec<UnixStream> = (0..SHORT.per_peer).map(|_| server.connect()).collect();
        let started = Instant::now();
        let mut over = server.connect();
        assert_eq!(get(&mut over), "");
        assert!(started.elapsed() < SHORT.head_timeout);
        drop(held);
        // Once they are gone, it is served again.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if get(&mut server.connect()).contains("answered") {
                break;
            }
            assert!(Instant::now() < deadline, "never served again");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(server.stop());
    }

    #[test]
    fn the_total_limit_holds_whatever_the_peers() {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let limits = Limits {
            per_peer: 100,
            ..SHORT
        };
        let slots: Vec<Slot> = (0..SHORT.connections as u32)
            .map(|uid| Slot::take(&counts, &Peer::Uid(uid), &limits).unwrap())
            .collect();
        assert!(Slot::take(&counts, &Peer::Uid(999), &limits).is_none());
        drop(slots);
        assert_eq!(lock(&counts).total, 0);
        assert!(lock(&counts).per_peer.is_empty());
        assert!(Slot::take(&counts, &Peer::Uid(999), &limits).is_some());
    }

    #[test]
    fn a_refused_peer_gets_its_answer_before_sending_anything() {
        let refuse: Arc<Refuse> = Arc::new(|peer: &Peer, via: Via| {
            assert_eq!(via, Via::Unix);
            Some(format!("not you: {peer:?}"))
        });
        let server = Server::start("refused", SHORT, refuse);
        // Nothing sent: the answer comes anyway, and the connection is closed.
        let mut s = server.connect();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.contains("\r\n\r\nnot you: Uid("), "{answer}");
        // A request sent meanwhile changes nothing.
        assert!(get(&mut server.connect()).starts_with("HTTP/1.1 403"));
        // Many refused connections at once hold no more than a few descriptors.
        let many: Vec<UnixStream> = (0..50).map(|_| server.connect()).collect();
        drop(many);
        assert!(server.stop());
    }

    #[test]
    fn stopping_closes_idle_connections_at_once() {
        let limits = Limits {
            head_timeout: Duration::from_secs(60),
            ..SHORT
        };
        let server = Server::start("stop", limits, nobody_refused());
        let mut idle = server.connect();
        // The connection is counted once the server accepted it.
        std::thread::sleep(Duration::from_millis(100));
        let stop = server.stop.clone();
        let _ = stop.send(true);
        assert!(closed(&mut idle));
        assert!(server.stop());
    }
}
