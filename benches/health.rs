//! Health while serving (README "Supervision"): the time from a webapp's hang to serving
//! again (with the default checks, every 10 s, 3 failures of 5 s, and with the short ones the
//! tests use), and what the checks cost keter: its CPU time over 60 s with 200 apps checked at
//! the default interval, against the same apps with `health-check-interval: 0`.
//!
//! Run: `cargo bench --bench health` (release build; about 6 minutes on two cores), or
//! `cargo bench --bench health -- hang` / `-- cost APPS` for one of them.

#[path = "../tests/integration/support.rs"]
mod support;

use std::fs;
use std::time::{Duration, Instant};

use support::*;

const HOST: &str = "hello.example.com";

fn main() {
    // `cargo bench` adds `--bench` to the arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let what = args.first().cloned();
    if what.as_deref().is_none_or(|w| w == "hang") {
        println!("1. a webapp that hangs (accepts, never answers) until it serves again");
        hang_to_serving("defaults (10 s, 3 failures, 5 s)", "");
        hang_to_serving(
            "0.3 s, 2 failures, 0.5 s",
            "health-check-interval: 0.3\nhealth-check-failures: 2\nhealth-check-timeout: 0.5\n",
        );
    }
    if what.as_deref().is_none_or(|w| w == "cost") {
        let apps: usize = args
            .get(1)
            .map(|a| a.parse().expect("cost APPS: a number of apps"))
            .unwrap_or(200);
        println!("2. keter's CPU time over 60 s with {apps} apps serving");
        let off = idle_cpu(apps, "health-check-interval: 0\n");
        let on = idle_cpu(apps, "");
        println!("   checks off: {off:.0} ms; checked every 10 s: {on:.0} ms");
        println!(
            "   the checks: {:.0} ms over 60 s, {:.3} % of one core ({:.0} µs a check)",
            on - off,
            (on - off) / 600.0,
            (on - off) * 1000.0 / (apps as f64 * 6.0)
        );
    }
}

/// Deploys an app that hangs after 3 requests, has it hang, and measures until a fresh
/// process answers.
fn hang_to_serving(label: &str, extra: &str) {
    let k = Keter::start_with(
        "bench-health-hang",
        Opts {
            stop_timeout: 1.0,
            extra: extra.into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &["--hang-after", "3"]);
    let status = k.wait_serving("hello", Duration::from_secs(30));
    let hung = status.pids()[0];
    let short = Duration::from_millis(500);
    // Requests until one gets no answer: the app hangs from then on.
    let began = loop {
        let at = Instant::now();
        if keter::probe::get_tcp(k.addr(), HOST, "/pid", short).is_err() {
            break at;
        }
    };
    loop {
        if let Ok(r) = keter::probe::get_tcp(k.addr(), HOST, "/pid", short)
            && r.status == 200
            && r.body.trim().parse::<i32>().is_ok_and(|p| p != hung)
        {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(120), "{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "   {label:<34} hang to serving again: {:.2} s",
        began.elapsed().as_secs_f64()
    );
}

/// keter's CPU time (ms) over 60 s with `apps` apps serving, after they all answered and 15 s
/// more (every app's first check has come by then).
fn idle_cpu(apps: usize, extra: &str) -> f64 {
    let k = Keter::start_with(
        "bench-health-cost",
        Opts {
            ports: (apps * 2).max(60) as u16,
            readiness_timeout: 60.0,
            extra: extra.into(),
            ..Opts::default()
        },
    );
    let dir = k.dir.0.join("many");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..apps {
        let path = dir.join(format!("m{i}.keter"));
        BundleBuilder::hello(&hello_yaml(
            &format!("m{i}"),
            &format!("m{i}.example.com"),
            &[],
        ))
        .write(&path);
        k.deploy(&format!("m{i}"), &path);
    }
    for i in 0..apps {
        k.wait_for(
            &format!("m{i}.example.com"),
            &format!("m{i}"),
            Duration::from_secs(300),
        );
    }
    std::thread::sleep(Duration::from_secs(15));
    let before = cpu_ticks(k.pid());
    std::thread::sleep(Duration::from_secs(60));
    (cpu_ticks(k.pid()) - before) as f64 * 10.0
}

/// utime + stime of a process (its ended threads included) in clock ticks (10 ms each).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
