//! Supervision costs: time from an app's crash (SIGKILL) to serving again, the daemon's
//! resident memory with 20 apps, and the CPU time it uses over 60 idle seconds.
//!
//! Run: `cargo bench --bench supervision` (release build; about 90 seconds).

#[path = "../tests/integration/support.rs"]
mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::*;

const APPS: usize = 20;
const CRASHES: usize = 20;
const IDLE: Duration = Duration::from_secs(60);

fn main() {
    let k = Keter::start_with(
        "bench-supervision",
        Opts {
            ports: 100,
            ..Opts::default()
        },
    );
    for i in 0..APPS {
        k.deploy_hello(
            &format!("app{i}"),
            &format!("v{i}"),
            &format!("app{i}.example.com"),
            &[],
        );
    }
    for i in 0..APPS {
        k.wait_for(
            &format!("app{i}.example.com"),
            &format!("v{i}"),
            Duration::from_secs(60),
        );
    }

    let mut restarts = Vec::new();
    for n in 0..CRASHES {
        let host = format!("app{}.example.com", n % APPS);
        let pid = k.pid_of(&host);
        let start = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        loop {
            if let Ok(r) = k.get(&host, "/pid")
                && r.status == 200
                && r.body.trim().parse::<i32>().is_ok_and(|p| p != pid)
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no restart:\n{}",
                k.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        restarts.push(start.elapsed());
        // Let the backoff reset its first delay for the next app (each app crashes once).
    }
    restarts.sort();

    // Quiet for a moment so that drains and log writers are done, then measure idle.
    std::thread::sleep(Duration::from_secs(2));
    let rss_kib = status_field(k.pid(), "VmRSS:");
    let threads = status_field(k.pid(), "Threads:");
    let before = cpu_ticks(k.pid());
    std::thread::sleep(IDLE);
    let after = cpu_ticks(k.pid());
    let tick_ms = 1000.0
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .unwrap()
            .unwrap() as f64;

    println!("supervision, {APPS} apps, release build");
    println!(
        "  crash (SIGKILL) to serving again, median of {CRASHES}   {:>7.1} ms  (min {:.1}, max {:.1})",
        ms(restarts[CRASHES / 2]),
        ms(restarts[0]),
        ms(restarts[CRASHES - 1])
    );
    println!(
        "  daemon RSS with {APPS} apps                    {:>7} KiB  ({threads} threads)",
        rss_kib
    );
    println!(
        "  daemon CPU over {} idle seconds              {:>7.1} ms",
        IDLE.as_secs(),
        (after - before) as f64 * tick_ms
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn status_field(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    fields[14 - 3].parse::<u64>().unwrap() + fields[15 - 3].parse::<u64>().unwrap()
}
