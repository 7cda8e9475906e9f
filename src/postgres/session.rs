//! A PostgreSQL session over a connection keter opened and checked itself
//! ([`super::listener`]), answering only SCRAM-SHA-256 with a password.
//!
//! The `postgres` crate (the synchronous client) connects by itself and answers whatever
//! authentication the server asks for, the password in clear text included. Its engine,
//! `tokio-postgres`, takes a stream that is already connected (`connect_raw`), so keter
//! drives it here on a private single-threaded runtime, as the synchronous client does: call
//! it from a plain thread, never from a tokio task.
//!
//! tokio-postgres has no setting that limits the authentication methods it answers (libpq's
//! `require_auth` has no counterpart), so the stream given to it is watched: the server's
//! first messages are read as they pass, and a request for the password in clear text
//! (AuthenticationCleartextPassword) or as an MD5 hash (AuthenticationMD5Password) fails the
//! read before the client has the whole message, so it never answers. SCRAM-SHA-256 proves
//! the password without revealing it, even to an impostor; a server that asks for nothing
//! (trust, peer) is answered as before.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};

use super::Secret;
use super::listener::Stream;

/// How long a session's end may take to tell the server goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Who logs in, to which database.
pub struct Login<'a> {
    pub user: &'a str,
    /// `None` for trust or peer authentication.
    pub password: Option<&'a Secret>,
    pub database: &'a str,
}

/// Why a session could not start.
#[derive(Debug)]
pub enum StartError {
    /// The server asked for the password in a form keter does not send; nothing was sent.
    Refused(AuthRefusal),
    /// No answer within the timeout.
    Timeout(Duration),
    /// The server or the connection failed (the server's own words in `describe`).
    Postgres(tokio_postgres::Error),
    /// The runtime could not be made, or the stream not handed to it.
    Io(io::Error),
}

/// An authentication request keter does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthRefusal {
    Cleartext,
    Md5,
}

impl fmt::Display for AuthRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            AuthRefusal::Cleartext => "the password in clear text",
            AuthRefusal::Md5 => "an MD5 hash of the password",
        };
        write!(
            f,
            "the server asked for {what}; keter answers only SCRAM-SHA-256 (pg_hba.conf method scram-sha-256, with the role's password stored as SCRAM: password_encryption = scram-sha-256), and sent nothing"
        )
    }
}

impl std::error::Error for AuthRefusal {}

/// A session, blocking: each call runs the query on the session's own runtime.
pub struct Session {
    /// `None` once dropped, so that the connection task sees the end.
    client: Option<Client>,
    /// Drives the connection: sends queries, reads answers and notices.
    connection: Option<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
}

impl Session {
    /// Logs in over `stream` within `timeout`.
    pub fn start(stream: Stream, login: &Login, timeout: Duration) -> Result<Session, StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(StartError::Io)?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(login.user)
            .dbname(login.database)
            .application_name("keter");
        if let Some(p) = login.password {
            config.password(p.expose());
        }
        let started = runtime.block_on(async {
            // Registered with the runtime's reactor, hence inside it.
            let io = Guarded::new(stream).map_err(StartError::Io)?;
            match tokio::time::timeout(timeout, config.connect_raw(io, NoTls)).await {
                Err(_) => Err(StartError::Timeout(timeout)),
                Ok(Err(e)) => Err(match refusal_in(&e) {
                    Some(r) => StartError::Refused(r),
                    None => StartError::Postgres(e),
                }),
                Ok(Ok(pair)) => Ok(pair),
            }
        });
        let (client, mut connection) = started?;
        let task = runtime.spawn(async move {
            std::future::poll_fn(|cx| {
                loop {
                    match connection.poll_message(cx) {
                        // The server's notices ("is already a member of role") say nothing an
                        // operator needs; the client would log them at info level, unprefixed.
                        Poll::Ready(Some(Ok(AsyncMessage::Notice(n)))) => {
                            log::debug!("postgres: {}: {}", n.severity(), n.message())
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => {
                            log::debug!("postgres: the connection ended: {e}");
                            return Poll::Ready(());
                        }
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await
        });
        Ok(Session {
            client: Some(client),
            connection: Some(task),
            runtime,
        })
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client lives as long as the session")
    }

    pub fn batch_execute(&mut self, statements: &str) -> Result<(), tokio_postgres::Error> {
        self.runtime
            .block_on(self.client().batch_execute(statements))
    }

    pub fn query_opt(
        &mut self,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        self.runtime
            .block_on(self.client().query_opt(query, params))
    }

    pub fn query_one(
        &mut self,
        query: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        self.runtime
            .block_on(self.client().query_one(query, params))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Without its client the connection says goodbye (Terminate) and ends; give it a
        // moment, so that the server does not log an unexpected end of file.
        drop(self.client.take());
        if let Some(task) = self.connection.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(CLOSE_GRACE, task).await });
        }
    }
}

/// The refusal of the watched stream, if that is why the client failed.
fn refusal_in(e: &tokio_postgres::Error) -> Option<AuthRefusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<AuthRefusal>())
        {
            return Some(*r);
        }
        source = s.source();
    }
    None
}

/// Watches the backend's messages until authentication is over (module doc). Messages are a
/// type byte and a big-endian length that counts itself; an authentication request (`R`)
/// starts with a 4-byte code: 0 ok, 3 clear text, 5 MD5, 10-12 SASL.
#[derive(Debug, Default)]
struct AuthWatch {
    /// The type, length and (for `R`) code of the message being read.
    head: [u8; 9],
    have: usize,
    /// Bytes of the current message's body still to pass.
    skip: usize,
    /// Authentication is over: nothing more to watch.
    done: bool,
}

impl AuthWatch {
    /// Takes the next bytes from the server; an error for a request keter does not answer.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), AuthRefusal> {
        while !bytes.is_empty() && !self.done {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            let len = || {
                u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
                    as usize
            };
            match (self.head[0], self.have) {
                (b'R', 5) if len() < 8 => {
                    // Malformed: the client refuses it by itself.
                    self.done = true;
                }
                (b'R', 9) => {
                    let code = u32::from_be_bytes([
                        self.head[5],
                        self.head[6],
                        self.head[7],
                        self.head[8],
                    ]);
                    match code {
                        0 => self.done = true,
                        3 => return Err(AuthRefusal::Cleartext),
                        5 => return Err(AuthRefusal::Md5),
                        _ => {}
                    }
                    self.skip = len() - 8;
                    self.have = 0;
                }
                (b'R', _) => {}
                (_, 5) => {
                    self.skip = len().saturating_sub(4);
                    self.have = 0;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The connection as tokio-postgres reads it, through an [`AuthWatch`].
struct Guarded {
    io: Io,
    watch: AuthWatch,
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Guarded {
    fn new(stream: Stream) -> io::Result<Guarded> {
        let io = match stream {
            Stream::Tcp(s) => {
                s.set_nonblocking(true)?;
                Io::Tcp(tokio::net::TcpStream::from_std(s)?)
            }
            Stream::Unix(s) => {
                s.set_nonblocking(true)?;
                Io::Unix(tokio::net::UnixStream::from_std(s)?)
            }
        };
        Ok(Guarded {
            io,
            watch: AuthWatch::default(),
        })
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = read
            && let Err(refusal) = this.watch.feed(&buf.filled()[before..])
        {
            // The client gets neither these bytes nor the rest of the request.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                refusal,
            )));
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend message of `kind` with `body`.
    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend(((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    fn auth(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend(rest);
        msg(b'R', &body)
    }

    /// Feeds `stream` in pieces of `size` bytes.
    fn watch(stream: &[u8], size: usize) -> Result<(), AuthRefusal> {
        let mut w = AuthWatch::default();
        for piece in stream.chunks(size) {
            w.feed(piece)?;
        }
        Ok(())
    }

    #[test]
    fn clear_text_and_md5_requests_are_refused_however_the_bytes_arrive() {
        let cleartext = auth(3, &[]);
        let md5 = auth(5, &[1, 2, 3, 4]);
        for size in [1, 2, 3, 5, 8, 64] {
            assert_eq!(
                watch(&cleartext, size),
                Err(AuthRefusal::Cleartext),
                "{size}"
            );
            assert_eq!(watch(&md5, size), Err(AuthRefusal::Md5), "{size}");
        }
        // The request is 9 bytes, its code the last 4: the refusal comes with its last byte,
        // and the read holding that byte is kept from the client, which so never has the
        // whole message.
        assert_eq!(cleartext.len(), 9);
        let mut w = AuthWatch::default();
        assert_eq!(w.feed(&cleartext[..8]), Ok(()));
        assert_eq!(w.feed(&cleartext[8..]), Err(AuthRefusal::Cleartext));
    }

    #[test]
    fn scram_trust_and_everything_after_authentication_pass() {
        let mut scram = auth(10, b"SCRAM-SHA-256\0\0");
        scram.extend(auth(11, b"r=abc,s=salt,i=4096"));
        scram.extend(auth(12, b"v=proof"));
        scram.extend(auth(0, &[]));
        // After AuthenticationOk nothing is watched: a row that happens to look like a
        // clear-text request is data.
        scram.extend(msg(b'S', b"client_encoding\0UTF8\0"));
        scram.extend(auth(3, &[]));
        for size in [1, 3, 7, 1000] {
            assert_eq!(watch(&scram, size), Ok(()), "{size}");
        }
        let mut trust = msg(b'E', b"SFATAL\0Mtoo many connections\0\0");
        trust.extend(auth(0, &[]));
        assert_eq!(watch(&trust, 2), Ok(()));
    }
}
