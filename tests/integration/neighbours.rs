//! Neighbours are left alone: a deploy of one app reloads Nginx, which retires every worker,
//! but a retired worker keeps serving the open connections of the other apps (websockets,
//! server-sent events, long downloads) for the longest `connection-time-bound`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A websocket through keter's Nginx to the example app, which echoes each chunk prefixed
/// with its version.
struct Websocket(TcpStream);

impl Websocket {
    fn open(k: &Keter, host: &str) -> Websocket {
        let mut s = TcpStream::connect(k.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "closed before the upgrade");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Websocket(s)
    }

    /// Sends `text` and returns the echo, or what went wrong.
    fn echo(&mut self, text: &str) -> Result<String, String> {
        self.0
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 256];
        match self.0.read(&mut buf) {
            Ok(0) => Err("closed".into()),
            Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[test]
fn a_redeploy_does_not_cut_a_neighbours_websocket_before_the_connection_time_bound() {
    // drain-time + 10 s was the bound before: 10.5 s here; the apps' bound is 20 s.
    let k = Keter::start_with(
        "neighbours-websocket",
        Opts {
            drain_time: 0.5,
            extra: "connection-time-bound: 20000\n".into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.deploy_hello("b", "b1", "b.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    k.wait_for("b.example.com", "b1", WAIT);
    let main = std::fs::read_to_string(k.root.join("nginx/nginx.conf")).unwrap();
    assert!(main.contains("worker_shutdown_timeout 20000ms;"), "{main}");
    let mut ws = Websocket::open(&k, "b.example.com");
    assert_eq!(ws.echo("one").unwrap(), "b1:one");
    // Two deploys of a: the worker holding b's websocket is retired by the first, before a2
    // answers; the websocket must outlive the old bound counted from then.
    k.deploy_hello("a", "a2", "a.example.com", &[]);
    k.wait_for("a.example.com", "a2", WAIT);
    let retired_before = std::time::Instant::now();
    k.deploy_hello("a", "a3", "a.example.com", &[]);
    k.wait_for("a.example.com", "a3", WAIT);
    std::thread::sleep(Duration::from_secs(12).saturating_sub(retired_before.elapsed()));
    assert_eq!(
        ws.echo("two"),
        Ok("b1:two".to_string()),
        "b's websocket was cut by a's deploys"
    );
    // An app without a bound lifts the bound of the retired workers.
    let path = k.dir.0.join("c.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, c1]\n    host: c.example.com\n    connection-time-bound: 0\n",
    )
    .write(&path);
    k.deploy("c", &path);
    k.wait_for("c.example.com", "c1", WAIT);
    let main = std::fs::read_to_string(k.root.join("nginx/nginx.conf")).unwrap();
    assert!(main.contains("worker_shutdown_timeout 365d;"), "{main}");
}
