//! Deploy latency: time from the rename of a bundle into `incoming/` to the first response
//! from the new version, against the example app's own time from exec to answering HTTP
//! (measured separately, same binary, same machine, same run). Prints medians of 20.
//!
//! Run: `cargo bench --bench deploy_latency` (builds keter and the example app in release mode).

#[path = "../tests/integration/support.rs"]
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const RUNS: usize = 20;
const HOST: &str = "bench.example.com";

fn main() {
    let app_own = app_time_to_answer();
    let (first, redeploy, bundle_bytes) = deploy_times();
    let m_app = median(&app_own);
    let m_first = median(&first);
    let m_redeploy = median(&redeploy);
    println!(
        "deploy latency, medians of {RUNS} (bundle {} KiB compressed)",
        bundle_bytes / 1024
    );
    println!(
        "  app alone, exec to first answer        {:>8.1} ms",
        ms(m_app)
    );
    println!(
        "  first deploy, rename to first answer   {:>8.1} ms",
        ms(m_first)
    );
    println!(
        "  redeploy, rename to first new answer   {:>8.1} ms",
        ms(m_redeploy)
    );
    println!(
        "  keter's overhead, first deploy         {:>8.1} ms",
        ms(m_first.saturating_sub(m_app))
    );
    println!(
        "  keter's overhead, redeploy             {:>8.1} ms",
        ms(m_redeploy.saturating_sub(m_app))
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// The example app started directly: exec to its first 200.
fn app_time_to_answer() -> Vec<Duration> {
    let hello = hello_binary();
    (0..RUNS)
        .map(|_| {
            let port = free_port();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let start = Instant::now();
            let mut child = Command::new(&hello)
                .env("PORT", port.to_string())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            loop {
                if let Ok(r) = keter::probe::get_tcp(addr, HOST, "/", Duration::from_secs(1))
                    && r.status == 200
                {
                    break;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let took = start.elapsed();
            child.kill().unwrap();
            child.wait().unwrap();
            took
        })
        .collect()
}

/// Through keter: first deploys of new apps, then redeploys of one app.
fn deploy_times() -> (Vec<Duration>, Vec<Duration>, u64) {
    let k = Keter::start_with(
        "bench-latency",
        Opts {
            drain_time: 2.0,
            ports: 100,
            ..Opts::default()
        },
    );
    let mut bundle_bytes = 0;
    let mut first = Vec::new();
    for i in 0..RUNS {
        let host = format!("first{i}.example.com");
        let version = format!("first-{i}");
        let path = k.dir.0.join(format!("first{i}.keter"));
        BundleBuilder::hello(&hello_yaml(&version, &host, &[])).write(&path);
        bundle_bytes = std::fs::metadata(&path).unwrap().len();
        first.push(time_deploy(
            &k,
            &format!("first{i}"),
            &path,
            &host,
            &version,
        ));
    }
    let mut redeploy = Vec::new();
    for i in 0..=RUNS {
        let version = format!("v{i}");
        let path = k.dir.0.join(format!("v{i}.keter"));
        BundleBuilder::hello(&hello_yaml(&version, HOST, &[])).write(&path);
        let took = time_deploy(&k, "bench", &path, HOST, &version);
        if i > 0 {
            redeploy.push(took);
        }
        // Let the old version drain so runs do not overlap.
        std::thread::sleep(Duration::from_millis(300));
    }
    (first, redeploy, bundle_bytes)
}

fn time_deploy(
    k: &Keter,
    name: &str,
    bundle: &std::path::Path,
    host: &str,
    version: &str,
) -> Duration {
    let staged = k.incoming().join(format!(".{name}.staged"));
    std::fs::copy(bundle, &staged).unwrap();
    let start = Instant::now();
    std::fs::rename(&staged, k.incoming().join(format!("{name}.keter"))).unwrap();
    loop {
        if let Ok(r) = k.get(host, "/")
            && r.status == 200
            && r.body.trim() == version
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} never served:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}
