//! A fake PostgreSQL server for the postgres plugin's tests: what a hostile app does while the
//! real server is not listening. It takes the server's TCP port or plants a socket, asks every
//! client for its password in clear text (AuthenticationCleartextPassword), and records what
//! it gets.
//!
//! ```text
//! pgsquat (--tcp ADDR:PORT | --unix PATH)
//! ```
//!
//! Each client: an SSLRequest is answered `N`, the startup message read (its `user`), the
//! password asked for in clear text and read, and a FATAL error sent. Each password is printed
//! as a line `received user=USER password=PASSWORD`. Run by keter as an app, it also answers
//! HTTP on `127.0.0.1:$PORT`: `/` gives `connections N` and then the `received` lines.
//! A socket is made with mode 0777, as PostgreSQL makes its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the squatter saw.
#[derive(Default)]
struct Seen {
    connections: usize,
    received: Vec<String>,
}

fn fail(why: &str) -> ! {
    eprintln!("pgsquat: {why}");
    std::process::exit(1)
}

/// One big-endian u32.
fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// A backend message: type, length counting itself, body.
fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend(((body.len() + 4) as u32).to_be_bytes());
    m.extend(body);
    m
}

/// Talks to one client; returns its user and password when it sent one.
fn squat(mut c: impl Read + Write) -> std::io::Result<Option<(String, String)>> {
    let startup = loop {
        let len = read_u32(&mut c)? as usize;
        if !(8..=10_000).contains(&len) {
            return Ok(None);
        }
        let mut body = vec![0u8; len - 4];
        c.read_exact(&mut body)?;
        // SSLRequest and GSSENCRequest: not here.
        if body[..4] == 80877103u32.to_be_bytes() || body[..4] == 80877104u32.to_be_bytes() {
            c.write_all(b"N")?;
            continue;
        }
        break body;
    };
    let fields: Vec<&[u8]> = startup[4..].split(|b| *b == 0).collect();
    let user = fields
        .chunks(2)
        .find(|kv| kv[0] == b"user")
        .and_then(|kv| kv.get(1))
        .map(|u| String::from_utf8_lossy(u).into_owned())
        .unwrap_or_default();
    c.write_all(&message(b'R', &3u32.to_be_bytes()))?;
    let mut kind = [0u8; 1];
    c.read_exact(&mut kind)?;
    let len = read_u32(&mut c)? as usize;
    if kind[0] != b'p' || !(5..=10_000).contains(&len) {
        return Ok(None);
    }
    let mut body = vec![0u8; len - 4];
    c.read_exact(&mut body)?;
    let password = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
    let _ = c.write_all(&message(
        b'E',
        b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0\0",
    ));
    Ok(Some((user, password)))
}

fn record(seen: &Mutex<Seen>, outcome: std::io::Result<Option<(String, String)>>) {
    let mut s = seen.lock().unwrap();
    s.connections += 1;
    if let Ok(Some((user, password))) = outcome {
        let line = format!("received user={user} password={password}");
        println!("{line}");
        s.received.push(line);
    }
}

fn serve_http(port: &str, seen: Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind(format!("127.0.0.1:{port}"))
        .unwrap_or_else(|e| fail(&format!("cannot listen on port {port}: {e}")));
    for stream in listener.incoming().flatten() {
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        });
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => {}
            }
        }
        let body = {
            let s = seen.lock().unwrap();
            let mut b = format!("connections {}\n", s.connections);
            for r in &s.received {
                b.push_str(r);
                b.push('\n');
            }
            b
        };
        let mut out = stream;
        let _ = out.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let timeout = Some(Duration::from_secs(10));
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--tcp", addr] => {
            let listener = TcpListener::bind(addr)
                .unwrap_or_else(|e| fail(&format!("cannot listen on {addr}: {e}")));
            let seen = seen.clone();
            std::thread::spawn(move || {
                for c in listener.incoming().flatten() {
                    let _ = c.set_read_timeout(timeout);
                    record(&seen, squat(c));
                }
            });
        }
        ["--unix", path] => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .unwrap_or_else(|e| fail(&format!("cannot listen on {path}: {e}")));
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777));
            let seen = seen.clone();
            std::thread::spawn(move || {
                for c in listener.incoming().flatten() {
                    let _ = c.set_read_timeout(timeout);
                    record(&seen, squat(c));
                }
            });
        }
        _ => fail("usage: pgsquat (--tcp ADDR:PORT | --unix PATH)"),
    }
    println!("pgsquat: listening");
    match std::env::var("PORT") {
        Ok(port) => serve_http(&port, seen),
        Err(_) => loop {
            std::thread::park();
        },
    }
}
