//! Supervision costs: time from an app's crash (SIGKILL) to serving again, the daemon's
//! resident memory with 20 apps, and the CPU time it uses over 60 idle seconds; then how long
//! another app's process that takes a crashed webapp's port gets its requests (from the exit
//! to Nginx routing to the webapp's new port), and the CPU time over 60 seconds with one
//! webapp crash-looping, its port watched all along (README "Supervision").
//!
//! Run: `cargo bench --bench supervision` (release build; about 3 minutes).

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

    let squatted = squats(&k);
    let looping = crash_looping_cpu(&k);

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
    if !squatted.is_empty() {
        println!(
            "  port squatted: exit to Nginx routing elsewhere, median of {}   {:>5.1} ms  (min {:.1}, max {:.1}; exit to holder seen: median {:.1} ms)",
            squatted.len(),
            ms(squatted[squatted.len() / 2].1),
            ms(squatted[0].1),
            ms(squatted[squatted.len() - 1].1),
            ms({
                let mut seen: Vec<Duration> = squatted.iter().map(|s| s.0).collect();
                seen.sort();
                seen[seen.len() / 2]
            })
        );
    } else {
        println!("  port squatted: keter never moved the webapp (a keter before the move?)");
    }
    println!(
        "  daemon CPU over {} s, one webapp crash-looping  {:>7.1} ms",
        IDLE.as_secs(),
        looping as f64 * tick_ms
    );
}

const SQUATS: usize = 9;

/// Kills app0, app1, ... in turn while a process with the uid of the last app binds the
/// killed app's port without pause; for each, from the exit to keter seeing the holder, and to
/// Nginx routing elsewhere, from the timestamps of keter's log (sorted by the second).
fn squats(k: &Keter) -> Vec<(Duration, Duration)> {
    use std::os::unix::process::CommandExt;
    let other = k.pid_of(&format!("app{}.example.com", APPS - 1));
    let status = std::fs::read_to_string(format!("/proc/{other}/status")).unwrap();
    let id = |field: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let (uid, gid) = (id("Uid:"), id("Gid:"));
    let exe = std::fs::read_link(format!("/proc/{other}/exe")).unwrap();
    let mut squatters = Vec::new();
    let mut out = Vec::new();
    for n in 0..SQUATS {
        let (app, host) = (format!("app{n}"), format!("app{n}.example.com"));
        let env = k.get(&host, "/env").unwrap().body;
        let port = env
            .lines()
            .find_map(|l| l.strip_prefix("PORT="))
            .unwrap()
            .to_string();
        let pid = k.pid_of(&host);
        let routes = format!("{app}: Nginx routes to ports");
        let routed = k.log_count(&routes);
        squatters.push(
            std::process::Command::new(&exe)
                .args(["--version-string", "squatter", "--wait-for-port"])
                .env_clear()
                .env("PORT", &port)
                .current_dir(exe.parent().unwrap())
                .uid(uid)
                .gid(gid)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let start = Instant::now();
        while k.log_count(&routes) == routed && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if k.log_count(&routes) == routed {
            // A keter that does not move webapps (KETER_BIN of before): the squatter keeps
            // the port; it goes, and the app gets its port back.
            let mut s = squatters.pop().unwrap();
            let _ = s.kill();
            let _ = s.wait();
            k.wait_for(&host, &format!("v{n}"), Duration::from_secs(60));
            break;
        }
        k.wait_for(&host, &format!("v{n}"), Duration::from_secs(30));
        let log = k.log();
        let at = |line: &str| parse_time(&line[1..24]);
        let last = |needle: &str| log.lines().rev().find(|l| l.contains(needle)).map(at);
        if let (Some(exit), Some(seen), Some(routed)) = (
            last(&format!("{app}: pid {pid} ")),
            last(&format!("{app}: port {port} of webapp 0 is held by")),
            last(&routes),
        ) {
            out.push((seen - exit, routed - exit));
        }
    }
    for mut s in squatters {
        let _ = s.kill();
        let _ = s.wait();
    }
    out.sort_by_key(|s| s.1);
    out
}

/// The daemon's CPU time (clock ticks) over `IDLE` while one webapp crash-loops (30 s between
/// restarts once the backoff is at its cap), its port looked at every 50 ms meanwhile.
fn crash_looping_cpu(k: &Keter) -> u64 {
    k.deploy_hello(
        "looper",
        "l1",
        "looper.example.com",
        &["--crash-after-first-run"],
    );
    k.wait_for("looper.example.com", "l1", Duration::from_secs(60));
    let _ = k.get("looper.example.com", "/exit");
    let start = Instant::now();
    while !k.log().contains("looper: pid") || k.log_count("restarting in 30000 ms") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no crash loop:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = cpu_ticks(k.pid());
    std::thread::sleep(IDLE);
    cpu_ticks(k.pid()) - before
}

/// Seconds since midnight of a log timestamp `2026-11-27T13:59:34.710`.
fn parse_time(t: &str) -> Duration {
    let (h, m, s) = (&t[11..13], &t[14..16], &t[17..23]);
    let secs: f64 = h.parse::<f64>().unwrap() * 3600.0
        + m.parse::<f64>().unwrap() * 60.0
        + s.parse::<f64>().unwrap();
    Duration::from_secs_f64(secs)
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
