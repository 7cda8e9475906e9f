//! What the sites see when keter itself goes away: an in-place upgrade (SIGUSR2) and a keter
//! killed by SIGKILL and started again, each ten times under continuous requests to three
//! apps (requests failed, the time until keter is back in control, app pids changed); and
//! what Nginx workers retired by reloads cost while they serve open websockets.
//!
//! Run: `cargo bench --bench takeover [upgrade|kill|lingering]` (release build, real Nginx).
//! `KETER_BIN=/path/to/keter` measures another build: a keter without the in-place upgrade
//! dies of SIGUSR2 and is started again here, as systemd's `Restart=` would.

#[path = "../tests/integration/support.rs"]
mod support;
#[path = "../tests/integration/traffic.rs"]
mod traffic;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::*;
use traffic::Traffic;

const CYCLES: usize = 10;
const HOSTS: [&str; 3] = ["a.example.com", "b.example.com", "c.example.com"];
const WAIT: Duration = Duration::from_secs(60);

fn main() {
    require_nginx();
    let only = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    println!(
        "\n{CYCLES} cycles each, three apps, per app 2 clients on new connections, 2 on kept-alive connections that resend, 1 on a kept-alive connection that does not"
    );
    println!(
        "\n| what happened to keter | requests failed (new / kept, resending) | kept-alive without resend | back in control, median (max) | app pids changed |"
    );
    println!("|---|---|---|---|---|");
    if run("upgrade") {
        cycles(true);
    }
    if run("kill") {
        cycles(false);
    }
    if run("lingering") {
        lingering();
    }
}

/// The binary started: a copy at a path of its own, which the upgrade cycles replace.
fn own_binary(dir: &Path) -> PathBuf {
    let from: PathBuf = std::env::var_os("KETER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keter").into());
    let path = dir.join("keter");
    let tmp = dir.join("keter.new");
    fs::copy(&from, &tmp).unwrap();
    set_mode(&tmp, 0o755);
    fs::rename(&tmp, &path).unwrap();
    path
}

/// Every app's processes' pids, from the status API.
fn pids(k: &Keter) -> Vec<i64> {
    let Some(keter::status::StatusAddress::Unix(sock)) = &k.status else {
        panic!("the bench uses a status socket");
    };
    let r = keter::probe::get_unix(sock, "/api/apps", Duration::from_secs(5)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["apps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["processes"].as_array().unwrap().clone())
        .map(|p| p["pid"].as_i64().unwrap_or(-1))
        .collect()
}

/// True once the status API answers with the three apps running.
fn in_control(k: &Keter) -> bool {
    let Some(keter::status::StatusAddress::Unix(sock)) = &k.status else {
        return false;
    };
    keter::probe::get_unix(sock, "/api/apps", Duration::from_secs(1)).is_ok_and(|r| {
        serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| {
            v["apps"]
                .as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().all(|a| a["state"] == "running"))
        })
    })
}

fn cycles(upgrade: bool) {
    let dir = TempDir::new("bench-takeover-bin");
    let bin = own_binary(&dir.0);
    let mut k = Keter::start_with(
        if upgrade {
            "bench-upgrade"
        } else {
            "bench-kill"
        },
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    for (i, host) in HOSTS.iter().enumerate() {
        let name = ["a", "b", "c"][i];
        k.deploy_hello(name, &format!("{name}1"), host, &["--log-requests"]);
    }
    for (i, host) in HOSTS.iter().enumerate() {
        k.wait_for(host, &format!("{}1", ["a", "b", "c"][i]), WAIT);
    }
    let before = pids(&k);
    let traffic = Traffic::with_clients(k.addr(), &HOSTS, 2, 2, 1, Duration::from_millis(1));
    std::thread::sleep(Duration::from_secs(1));
    let mut took = Vec::new();
    for _ in 0..CYCLES {
        let start = Instant::now();
        if upgrade {
            own_binary(&dir.0);
            let watching = k.log_count("keter: watching");
            k.signal(Signal::SIGUSR2);
            // Back once the new image watches again and answers; a keter that died of the
            // signal is started again, as systemd would.
            loop {
                if k.log_count("keter: watching") > watching && in_control(&k) {
                    break;
                }
                if k.exited() {
                    k.launch();
                }
                assert!(start.elapsed() < WAIT, "{}", k.log());
                std::thread::sleep(Duration::from_millis(1));
            }
        } else {
            let _ = k.signal_and_wait(Signal::SIGKILL);
            let start = Instant::now();
            k.launch_no_wait();
            while !in_control(&k) {
                assert!(start.elapsed() < WAIT, "{}", k.log());
                std::thread::sleep(Duration::from_millis(1));
            }
            took.push(start.elapsed());
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        took.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(500));
    let tally = traffic.stop();
    let after = pids(&k);
    let changed = before.iter().filter(|p| !after.contains(p)).count();
    took.sort();
    let fresh_failed = tally.failures.iter().filter(|f| f.contains(" f")).count();
    println!(
        "| {} | {} / {} of {} | {} | {:.0} ms ({:.0} ms) | {changed} of {} |",
        if upgrade {
            "SIGUSR2 (in-place upgrade to a new file at the start path)"
        } else {
            "SIGKILL, then started again"
        },
        fresh_failed,
        tally.failed() - fresh_failed,
        tally.ok + tally.failed() as u64,
        tally.blunt_failures.len(),
        took[took.len() / 2].as_secs_f64() * 1000.0,
        took[took.len() - 1].as_secs_f64() * 1000.0,
        before.len()
    );
}

/// Resident and proportional set sizes (kB) of the Nginx master `master` and its workers,
/// and the number of workers.
fn nginx_memory(master: i32) -> (u64, u64, usize) {
    let workers = keter::procfs::nginx_workers(master);
    let mut rss = 0;
    let mut pss = 0;
    for pid in std::iter::once(master).chain(workers.iter().map(|(p, _)| *p)) {
        let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        for line in text.lines() {
            let kb = || {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if line.starts_with("Rss:") {
                rss += kb();
            } else if line.starts_with("Pss:") {
                pss += kb();
            }
        }
    }
    (rss, pss, workers.len())
}

/// A websocket to the example app through keter's Nginx, kept open.
fn websocket(k: &Keter, host: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(k.addr()).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// Nginx's memory after 20 reloads (deploys of app a) with 50 websockets open to app b,
/// opened all before the reloads, or spread over them (every retired generation of workers
/// then holds some).
fn lingering() {
    println!(
        "\nNginx workers that reloads retire while they serve open websockets (connection-time-bound 300 s, the default; 20 deploys of another app)"
    );
    println!("\n| | Nginx workers | RSS of master and workers | PSS | PSS per retired worker |");
    println!("|---|---|---|---|---|");
    for spread in [false, true] {
        let k = Keter::start(if spread {
            "bench-linger-spread"
        } else {
            "bench-linger"
        });
        k.deploy_hello("a", "a0", "a.example.com", &[]);
        k.deploy_hello("b", "b1", "b.example.com", &[]);
        k.wait_for("a.example.com", "a0", WAIT);
        k.wait_for("b.example.com", "b1", WAIT);
        let master = k.nginx_pid();
        let (rss0, pss0, workers0) = nginx_memory(master);
        if !spread {
            println!("| no websocket, before the deploys | {workers0} | {rss0} kB | {pss0} kB | |");
        }
        let mut sockets = Vec::new();
        if !spread {
            sockets.extend((0..50).map(|_| websocket(&k, "b.example.com")));
        }
        for i in 1..=20 {
            if spread {
                let n = if i <= 10 { 3 } else { 2 };
                sockets.extend((0..n).map(|_| websocket(&k, "b.example.com")));
            }
            k.deploy_hello("a", &format!("a{i}"), "a.example.com", &[]);
            k.wait_for("a.example.com", &format!("a{i}"), WAIT);
        }
        assert_eq!(sockets.len(), 50);
        std::thread::sleep(Duration::from_secs(1));
        let (rss, pss, workers) = nginx_memory(master);
        let retired = workers.saturating_sub(workers0).max(1);
        println!(
            "| 50 websockets {}, after 20 deploys | {workers} | {rss} kB | {pss} kB | {:.0} kB |",
            if spread {
                "opened across the deploys"
            } else {
                "opened before the deploys"
            },
            (pss.saturating_sub(pss0)) as f64 / retired as f64
        );
        drop(sockets);
    }
}
