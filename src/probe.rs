//! keter's own HTTP requests: the readiness check of an app on `127.0.0.1:PORT` ([`ready`]),
//! and small whole answers from local peers ([`get_tcp`], [`get_unix`], [`get`]): the
//! generation check on Nginx's unix control socket and `keter status` reading the daemon's API.
//!
//! Every peer is local and known, so no proxy (an `http_proxy` variable must never send a
//! readiness check elsewhere), no redirects and no TLS: statuses are data.
//!
//! The readiness check uses `ureq` and stops after the response head: an app's home page may
//! be a large chunked body (a Yesod page streamed by Warp) and its server may keep the
//! connection open, neither of which may cost the check anything. The whole-answer client
//! below stays hand-written because its two peers are reached over unix sockets, which
//! `ureq` reaches only through its unversioned transport API; their answers are a few bytes
//! (the control socket) or keter's own JSON.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Why a readiness check got no status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// Nothing listens on the port (yet).
    Refused,
    /// Something else: a timeout, a reset, an answer that is not HTTP.
    Failed(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Refused => f.write_str("connection refused"),
            ProbeError::Failed(m) => f.write_str(m),
        }
    }
}

/// `GET path` with `Host: host` on `addr`; the status of the answer, read from its head
/// alone (the body is never read, and the connection is closed). `timeout` bounds the whole
/// exchange.
pub fn ready(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<u16, ProbeError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .max_redirects(0)
        .http_status_as_error(false)
        .max_idle_connections(0)
        .user_agent("keter")
        .timeout_global(Some(timeout))
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    match agent.get(&url).header("Host", host).call() {
        Ok(response) => Ok(response.status().as_u16()),
        Err(ureq::Error::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ProbeError::Refused)
        }
        Err(e) => Err(ProbeError::Failed(e.to_string())),
    }
}

/// The status and body of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` with `Host: host` over TCP, bounded by `timeout` for connect and for each read.
pub fn get_tcp(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    exchange(&mut stream, host, path)
}

/// `GET path` over a unix socket (Nginx's control server).
pub fn get_unix(socket: &Path, path: &str, timeout: Duration) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    exchange(&mut stream, "keter-control", path)
}

fn exchange(stream: &mut (impl Read + Write), host: &str, path: &str) -> io::Result<Response> {
    // Readiness and control answers are small; a cap keeps a misbehaving app from feeding us
    // forever.
    get(stream, host, path, 64 * 1024)
}

/// `GET path` with `Host: host` on an open connection, reading at most `max_bytes` of answer.
pub fn get(
    stream: &mut (impl Read + Write),
    host: &str,
    path: &str,
    max_bytes: u64,
) -> io::Result<Response> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: keter\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    stream.take(max_bytes).read_to_end(&mut buf)?;
    parse(&buf)
}

fn parse(buf: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let text = String::from_utf8_lossy(buf);
    let line = text.lines().next().ok_or_else(|| bad("empty response"))?;
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| bad("no status code in the response"))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Ok(Response {
            status,
            body: String::new(),
        });
    };
    let chunked = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body).map_err(bad)?
    } else {
        body.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &str) -> Result<String, &'static str> {
    let mut out = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").ok_or("a truncated chunk")?;
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "a bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or("a truncated chunk")?;
        out.push_str(chunk);
        rest = after.get(size + 2..).ok_or("a truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((plain.status, plain.body.as_str()), (200, "{}"));
        let chunked = parse(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((chunked.status, chunked.body.as_str()), (200, "abcde"));
        assert!(parse(b"garbage").is_err());
    }

    /// A server on a free port that answers one request with `head`, then `body_chunks`
    /// chunks of 8 KiB, and then keeps the connection open until the test ends.
    fn serve_once(
        head: &'static str,
        body_chunks: usize,
    ) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = s.write_all(head.as_bytes());
            let chunk = format!("2000\r\n{}\r\n", "y".repeat(0x2000));
            for _ in 0..body_chunks {
                if s.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
            }
            // Keep the connection open (no final chunk) until the client has gone.
            let _ = s.read(&mut req);
        });
        (addr, t)
    }

    #[test]
    fn readiness_stops_after_the_head_of_a_large_chunked_answer() {
        let (addr, t) = serve_once("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", 30);
        // 240 KiB of chunks and no end: only the head counts.
        assert_eq!(
            ready(addr, "app.example.com", "/", Duration::from_secs(30)),
            Ok(200)
        );
        t.join().unwrap();
    }

    #[test]
    fn readiness_reports_statuses_and_refusals() {
        let (addr, t) = serve_once("HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n", 0);
        assert_eq!(ready(addr, "h", "/up", Duration::from_secs(30)), Ok(503));
        t.join().unwrap();
        let (addr, t) = serve_once(
            "HTTP/1.1 301 Moved\r\nlocation: http://elsewhere.invalid/\r\ncontent-length: 0\r\n\r\n",
            0,
        );
        assert_eq!(ready(addr, "h", "/", Duration::from_secs(30)), Ok(301));
        t.join().unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            ready(free, "h", "/", Duration::from_secs(5)),
            Err(ProbeError::Refused)
        );
    }

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno").unwrap();
        assert_eq!(
            r,
            Response {
                status: 503,
                body: "no".into()
            }
        );
        assert!(parse(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse(b"").is_err());
    }
}
