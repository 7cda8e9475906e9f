//! Rollout time: `keter deploy` of a new version to 3 hosts (one after another, and with
//! `--parallel 3`), against three single deploys (`keter deploy` to one host, three times)
//! and against the same new version renamed into each host's `incoming/` directly, one host
//! after the other, without SSH; and `keter rollback NAME --hosts` to the previous version on
//! the 3 hosts, against the host's own `keter rollback NAME` run on each, without SSH. The
//! hosts are network namespaces with their own sshd, keter and Nginx on this machine
//! (`tests/integration/ssh_hosts.rs`), so SSH costs its handshakes and logins, not a network.
//! Prints medians of 5.
//!
//! Run: `cargo bench --bench rollout` (as root: it creates network namespaces).

#[path = "../tests/integration/support.rs"]
mod support;

#[path = "../tests/integration/ssh_hosts.rs"]
mod ssh_hosts;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ssh_hosts::Hosts;
use support::*;

const RUNS: usize = 5;
const HOST: &str = "shop.example.com";

fn main() {
    let hosts = Hosts::start("bench-rollout", 3, || Opts {
        drain_time: 0.3,
        ..Opts::default()
    });
    let config = hosts.config();
    let config_arg = config.to_str().unwrap();
    let all = hosts.list(&[0, 1, 2]);
    let mut n = 0;
    let mut next = || {
        n += 1;
        bundle(&hosts.dir.0, &format!("v{n}"))
    };
    // Every host serves a first version before anything is measured.
    let (_, first) = next();
    deploy(&hosts, &first, &all, &config, &[]);

    let (mut rollout, mut parallel, mut singles, mut local) = (vec![], vec![], vec![], vec![]);
    let (mut rollback, mut local_rollback) = (vec![], vec![]);
    for _ in 0..RUNS {
        let (_, b) = next();
        let t = Instant::now();
        deploy(&hosts, &b, &all, &config, &[]);
        rollout.push(t.elapsed());
        settle();

        let (_, b) = next();
        let t = Instant::now();
        deploy(&hosts, &b, &all, &config, &["--parallel", "3"]);
        parallel.push(t.elapsed());
        settle();

        let (_, b) = next();
        let t = Instant::now();
        for i in 0..3 {
            deploy(&hosts, &b, &hosts.list(&[i]), &config, &[]);
        }
        singles.push(t.elapsed());
        settle();

        let (version, b) = next();
        let t = Instant::now();
        for h in &hosts.hosts {
            let k = h.keter();
            let staged = k.incoming().join(".shop.staged");
            std::fs::copy(&b, &staged).unwrap();
            std::fs::rename(&staged, k.incoming().join("shop.keter")).unwrap();
            wait_serving(k, &version);
        }
        local.push(t.elapsed());
        settle();

        // Back to the version before (the three single deploys'), on every host over SSH.
        let t = Instant::now();
        let (code, out, err) = hosts.rollback(&["shop", "--hosts", &all, "-c", config_arg]);
        assert_eq!(code, 0, "{out}\n{err}");
        rollback.push(t.elapsed());
        settle();

        // A new version again, then back to the one before on each host by its own command.
        let (version, b) = next();
        for h in &hosts.hosts {
            let k = h.keter();
            let staged = k.incoming().join(".shop.staged");
            std::fs::copy(&b, &staged).unwrap();
            std::fs::rename(&staged, k.incoming().join("shop.keter")).unwrap();
            wait_serving(k, &version);
        }
        settle();
        let t = Instant::now();
        for h in &hosts.hosts {
            let k = h.keter();
            let out = std::process::Command::new(&k.bin)
                .args(["rollback", "shop", "-c"])
                .arg(&k.config_path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        local_rollback.push(t.elapsed());
        settle();
    }
    let size = std::fs::metadata(&first).unwrap().len();
    println!(
        "rollout to 3 hosts, medians of {RUNS} (bundle {} KiB compressed; hosts on this machine)",
        size / 1024
    );
    let row = |what: &str, v: &[Duration]| {
        println!("  {what:<58} {:>8.0} ms", median(v).as_secs_f64() * 1000.0);
    };
    row("keter deploy --hosts h1,h2,h3", &rollout);
    row("keter deploy --hosts h1,h2,h3 --parallel 3", &parallel);
    row(
        "three single deploys (keter deploy --hosts hN, 3 times)",
        &singles,
    );
    row("rename into each incoming/, wait, no SSH (3 hosts)", &local);
    row("keter rollback shop --hosts h1,h2,h3", &rollback);
    row(
        "keter rollback shop on each host, no SSH (3 hosts)",
        &local_rollback,
    );
}

fn bundle(dir: &Path, version: &str) -> (String, PathBuf) {
    let folder = dir.join(version);
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("shop.keter");
    BundleBuilder::hello(&hello_yaml(version, HOST, &[])).write(&path);
    (version.to_string(), path)
}

fn deploy(hosts: &Hosts, bundle: &Path, list: &str, config: &Path, more: &[&str]) {
    let mut args = vec![
        bundle.to_str().unwrap(),
        "--hosts",
        list,
        "-c",
        config.to_str().unwrap(),
    ];
    args.extend(more);
    let (code, out, err) = hosts.deploy(&args);
    assert_eq!(code, 0, "{out}\n{err}");
}

/// Until the host answers `version` (what `keter deploy` waits for is the status; Nginx
/// switches at the same step).
fn wait_serving(k: &Keter, version: &str) {
    let start = Instant::now();
    loop {
        if let Ok(r) = k.get(HOST, "/")
            && r.status == 200
            && r.body.trim() == version
        {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{}", k.log());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Lets the previous versions drain, so runs do not overlap.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}
