//! `keter deploy` and `keter rollback --hosts` against several hosts, each a network namespace
//! with its own sshd, keter and Nginx (`ssh_hosts.rs`): a rolling deploy under traffic, a
//! broken bundle stopped at the first host, an unreachable host, a parallel rollout; a
//! rollback under traffic, and one stopped at a host with no earlier release (README "Several
//! hosts").

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::ssh_hosts::Hosts;
use crate::support::*;

const HOST: &str = "shop.example.com";

/// A bundle file `shop.keter` of the example app answering `version`, in its own folder.
fn shop_bundle(dir: &Path, version: &str, args: &[&str]) -> PathBuf {
    let folder = dir.join(version);
    fs::create_dir_all(&folder).unwrap();
    let path = folder.join("shop.keter");
    BundleBuilder::hello(&hello_yaml(version, HOST, args)).write(&path);
    path
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn opts() -> Opts {
    Opts {
        drain_time: 0.5,
        ..Opts::default()
    }
}

/// What is in a host's incoming/: names and contents.
fn incoming(k: &Keter) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(k.incoming())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A client per host, requesting it throughout, counting the answers that are `version`.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u32, Vec<String>, u32)>>,
}

impl Clients {
    fn start(hosts: &Hosts, version: &'static str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = hosts
            .hosts
            .iter()
            .map(|h| {
                let addr = h.keter().addr();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed, mut seen) = (0u32, Vec::new(), 0u32);
                    while !stop.load(Ordering::Relaxed) {
                        match keter::probe::get_tcp(addr, HOST, "/", Duration::from_secs(5)) {
                            Ok(r) if r.status == 200 => {
                                ok += 1;
                                if r.body.trim() == version {
                                    seen += 1;
                                }
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    (ok, failed, seen)
                })
            })
            .collect();
        Clients { stop, threads }
    }

    /// Per host: answers, failures, answers that were the version looked for.
    fn stop(self) -> Vec<(u32, Vec<String>, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect()
    }
}

/// Every host answered its client throughout (more than 20 answers, none failed), some of
/// them as `version`.
fn every_host_served(results: &[(u32, Vec<String>, u32)], version: &str) {
    for (i, (ok, failed, seen)) in results.iter().enumerate() {
        assert!(
            failed.is_empty(),
            "host {i}: {} failed: {failed:?}",
            failed.len()
        );
        assert!(
            *ok > 20 && *seen > 0,
            "host {i}: {ok} answers, {seen} of {version}"
        );
    }
}

#[test]
fn a_rollout_reaches_every_host_in_turn_and_no_request_fails() {
    let hosts = Hosts::start("deploy-rollout", 3, opts);
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    for h in &hosts.hosts {
        h.keter().deploy("shop", &v1);
    }
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v1", Duration::from_secs(20));
    }
    let clients = Clients::start(&hosts, "v2");

    let v2 = shop_bundle(&hosts.dir.0, "v2", &[]);
    let config = hosts.config();
    let (code, out, err) = hosts.deploy(&[
        v2.to_str().unwrap(),
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
        "--json",
    ]);
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v2", Duration::from_secs(10));
    }
    let results = clients.stop();
    assert_eq!(code, 0, "{out}\n{err}");
    every_host_served(&results, "v2");
    let report = json(&out);
    assert_eq!(report["result"], "succeeded", "{out}");
    assert_eq!(report["app"], "shop");
    let sha = report["sha256"].as_str().unwrap();
    let listed = report["hosts"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    for (i, h) in listed.iter().enumerate() {
        assert_eq!(h["host"], hosts.hosts[i].destination.as_str(), "{out}");
        assert_eq!(h["result"], "serving", "{out}");
        // One host after the other.
        if i > 0 {
            assert!(
                h["started_ms"].as_u64() >= listed[i - 1]["finished_ms"].as_u64(),
                "{out}"
            );
        }
        // Progress: the host's steps, with times.
        let dest = &hosts.hosts[i].destination;
        for step in ["connecting", "copied in", "serving sha256"] {
            assert!(
                err.lines().any(|l| l.contains(&format!("{dest}: {step}"))),
                "no {step:?} line for {dest}:\n{err}"
            );
        }
        // The host's keter serves the bundle, and its incoming/ holds it alone, whole.
        let k = hosts.hosts[i].keter();
        let status = keter_status(k);
        let app = &status["apps"][0];
        assert_eq!(app["sha256"], sha, "{status}");
        assert_eq!(incoming(k), [("shop.keter".into(), fs::read(&v2).unwrap())]);
    }
}

#[test]
fn a_broken_bundle_stops_at_the_first_host_and_leaves_the_others_untouched() {
    let hosts = Hosts::start("deploy-broken", 3, opts);
    let config = hosts.config();
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    for h in &hosts.hosts {
        h.keter().deploy("shop", &v1);
    }
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v1", Duration::from_secs(20));
    }
    let before: Vec<_> = hosts.hosts.iter().map(|h| incoming(h.keter())).collect();

    // A bundle the local check refuses: nothing is copied anywhere.
    let refused = hosts.dir.0.join("refused").join("shop.keter");
    fs::create_dir_all(refused.parent().unwrap()).unwrap();
    BundleBuilder::new()
        .file(
            "config/keter.yaml",
            b"exec: ../dist/missing\nhost: [\n".to_vec(),
            0o644,
        )
        .write(&refused);
    let (code, out, err) = hosts.deploy(&[
        refused.to_str().unwrap(),
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("nothing was copied"), "{err}");
    assert!(err.contains("config/keter.yaml"), "{err}");

    // A bundle that passes the check, but whose app exits at start: the first host's keter
    // fails the deploy, and the rollout stops there.
    let broken = shop_bundle(&hosts.dir.0, "v2", &["--crash"]);
    let (code, out, err) = hosts.deploy(&[
        broken.to_str().unwrap(),
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{out}\n{err}");
    let row = |i: usize| {
        out.lines()
            .find(|l| l.starts_with(&hosts.hosts[i].destination))
            .unwrap_or_else(|| panic!("no row for host {i}:\n{out}"))
            .to_string()
    };
    assert!(out.starts_with("HOST "), "{out}");
    assert!(row(0).contains("failed"), "{out}");
    assert!(
        row(0).contains("the host's keter failed the deploy"),
        "{out}"
    );
    assert!(row(1).contains("not reached"), "{out}");
    assert!(row(2).contains("not reached"), "{out}");
    assert!(
        err.contains(&format!(
            "the rollout stopped at {}",
            hosts.hosts[0].destination
        )),
        "{err}"
    );
    // The first host keeps serving v1; the others were not touched at all.
    hosts.hosts[0]
        .keter()
        .wait_for(HOST, "v1", Duration::from_secs(5));
    for (i, h) in hosts.hosts.iter().enumerate().skip(1) {
        assert_eq!(incoming(h.keter()), before[i], "host {i}");
        h.keter().wait_for(HOST, "v1", Duration::from_secs(5));
    }
}

#[test]
fn an_unreachable_host_is_reported_with_ssh_own_error_and_stops_the_rollout() {
    let mut hosts = Hosts::start("deploy-unreachable", 1, opts);
    let down = hosts.add(false, opts);
    hosts.add(true, opts);
    let config = hosts.config();
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    let (code, out, err) = hosts.deploy(&[
        v1.to_str().unwrap(),
        "--hosts",
        &hosts.list(&[0, down, 2]),
        "-c",
        config.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 3, "{out}\n{err}");
    let report = json(&out);
    assert_eq!(report["result"], "stopped", "{out}");
    let listed = &report["hosts"];
    assert_eq!(listed[0]["result"], "serving", "{out}");
    assert_eq!(listed[1]["result"], "unreachable", "{out}");
    let error = listed[1]["error"].as_str().unwrap();
    // ssh's own words: its "connect to host ADDRESS port 22: ..." line.
    assert!(
        error.contains(&format!(
            "connect to host {} port 22",
            hosts.hosts[down].address
        )),
        "{out}"
    );
    assert_eq!(listed[2]["result"], "not-reached", "{out}");
    hosts.hosts[0]
        .keter()
        .wait_for(HOST, "v1", Duration::from_secs(5));
    assert!(incoming(hosts.hosts[2].keter()).is_empty());
    assert_eq!(
        hosts.hosts[2].keter().get(HOST, "/").unwrap().status,
        404,
        "the host after the unreachable one got the app"
    );
}

#[test]
fn a_parallel_rollout_deploys_to_several_hosts_at_once() {
    let hosts = Hosts::start("deploy-parallel", 3, opts);
    let config = hosts.config();
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    let (code, out, err) = hosts.deploy(&[
        v1.to_str().unwrap(),
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
        "--parallel",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let report = json(&out);
    let listed = report["hosts"].as_array().unwrap();
    assert!(listed.iter().all(|h| h["result"] == "serving"), "{out}");
    let started = listed
        .iter()
        .map(|h| h["started_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    let finished = listed
        .iter()
        .map(|h| h["finished_ms"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(
        started < finished,
        "the last host started after the first one finished: not in parallel\n{out}"
    );
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v1", Duration::from_secs(5));
    }
}

/// `keter deploy BUNDLE --hosts` to these hosts, which must succeed; returns the bundle's
/// sha256.
fn deploy_to(hosts: &Hosts, bundle: &Path, which: &[usize]) -> String {
    let config = hosts.config();
    let (code, out, err) = hosts.deploy(&[
        bundle.to_str().unwrap(),
        "--hosts",
        &hosts.list(which),
        "-c",
        config.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    json(&out)["sha256"].as_str().unwrap().to_string()
}

/// The host's releases of the app, as `keter releases shop --json` lists them there.
fn releases(k: &Keter) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keter"))
        .args(["releases", "shop", "--json", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    json(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn a_rollback_goes_back_on_every_host_in_turn_and_no_request_fails() {
    let hosts = Hosts::start("rollback-hosts", 3, opts);
    let config = hosts.config();
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    let v1_sha = deploy_to(&hosts, &v1, &[0, 1, 2]);
    let v2 = shop_bundle(&hosts.dir.0, "v2", &[]);
    let v2_sha = deploy_to(&hosts, &v2, &[0, 1, 2]);
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v2", Duration::from_secs(10));
    }

    let clients = Clients::start(&hosts, "v1");
    let (code, out, err) = hosts.rollback(&[
        "shop",
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
        "--json",
    ]);
    for h in &hosts.hosts {
        h.keter().wait_for(HOST, "v1", Duration::from_secs(10));
    }
    let results = clients.stop();
    assert_eq!(code, 0, "{out}\n{err}");
    every_host_served(&results, "v1");
    let report = json(&out);
    assert_eq!(report["action"], "rollback", "{out}");
    assert_eq!(report["result"], "succeeded", "{out}");
    assert_eq!(report["app"], "shop");
    let listed = report["hosts"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    for (i, h) in listed.iter().enumerate() {
        assert_eq!(h["host"], hosts.hosts[i].destination.as_str(), "{out}");
        assert_eq!(h["result"], "serving", "{out}");
        // Each host went back to v1: its release 1, by its own list.
        assert_eq!(h["sha256"], v1_sha.as_str(), "{out}");
        assert_eq!(h["release"], 1, "{out}");
        assert!(h["rollback_ms"].as_u64().is_some(), "{out}");
        if i > 0 {
            assert!(
                h["started_ms"].as_u64() >= listed[i - 1]["finished_ms"].as_u64(),
                "{out}"
            );
        }
        let dest = &hosts.hosts[i].destination;
        for step in [
            "connecting",
            "rolling back from release 2",
            "keter rollback in",
            "serving sha256",
        ] {
            assert!(
                err.lines()
                    .any(|l| l.contains(&format!("{dest}: ")) && l.contains(step)),
                "no {step:?} line for {dest}:\n{err}"
            );
        }
        // The host's keter serves v1 again, from its incoming/, and v2 is marked rolled back.
        let k = hosts.hosts[i].keter();
        assert_eq!(keter_status(k)["apps"][0]["sha256"], v1_sha.as_str());
        assert_eq!(incoming(k), [("shop.keter".into(), fs::read(&v1).unwrap())]);
        let list = releases(k);
        let list = list["releases"].as_array().unwrap();
        assert_eq!(list.len(), 3, "{list:?}");
        assert_eq!(list[1]["sha256"], v2_sha.as_str());
        assert_eq!(list[1]["ended"], "rolled-back", "{list:?}");
        assert_eq!(list[2]["rollback_of"], 1, "{list:?}");
    }
}

#[test]
fn a_host_with_no_earlier_release_stops_the_rollback_there() {
    let hosts = Hosts::start("rollback-stops", 3, opts);
    let config = hosts.config();
    // Hosts 0 and 2 get v1 then v2; host 1 only v2, its one release.
    let v1 = shop_bundle(&hosts.dir.0, "v1", &[]);
    let v1_sha = deploy_to(&hosts, &v1, &[0, 2]);
    let v2 = shop_bundle(&hosts.dir.0, "v2", &[]);
    let v2_sha = deploy_to(&hosts, &v2, &[0, 1, 2]);
    let before = releases(hosts.hosts[2].keter());

    let (code, out, err) = hosts.rollback(&[
        "shop",
        "--hosts",
        &hosts.list(&[0, 1, 2]),
        "-c",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{out}\n{err}");
    let row = |out: &str, i: usize| {
        out.lines()
            .find(|l| l.starts_with(&hosts.hosts[i].destination))
            .unwrap_or_else(|| panic!("no row for host {i}:\n{out}"))
            .to_string()
    };
    assert!(out.starts_with("HOST "), "{out}");
    assert!(out.lines().next().unwrap().contains("ROLLBACK"), "{out}");
    assert!(row(&out, 0).contains("serving"), "{out}");
    assert!(row(&out, 0).contains(&v1_sha[..12]), "{out}");
    assert!(row(&out, 1).contains("failed"), "{out}");
    assert!(
        row(&out, 1).contains("rollback failed: there is no earlier release"),
        "{out}"
    );
    assert!(row(&out, 2).contains("not reached"), "{out}");
    assert!(
        err.contains(&format!(
            "the rollback stopped at {}",
            hosts.hosts[1].destination
        )),
        "{err}"
    );
    // Host 0 went back; host 1 keeps v2; host 2 was not touched at all.
    hosts.hosts[0]
        .keter()
        .wait_for(HOST, "v1", Duration::from_secs(5));
    hosts.hosts[1]
        .keter()
        .wait_for(HOST, "v2", Duration::from_secs(5));
    let k = hosts.hosts[2].keter();
    k.wait_for(HOST, "v2", Duration::from_secs(5));
    assert_eq!(incoming(k), [("shop.keter".into(), fs::read(&v2).unwrap())]);
    assert_eq!(releases(k), before);
    assert_eq!(keter_status(k)["apps"][0]["sha256"], v2_sha.as_str());

    // Run again with the bundle host 0 went to: host 0 already serves it and is left as it
    // is, host 2 goes back to it.
    let (code, out, err) = hosts.rollback(&[
        "shop",
        &v1_sha[..12],
        "--hosts",
        &hosts.list(&[0, 2]),
        "-c",
        config.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let report = json(&out);
    assert_eq!(report["release"], &v1_sha[..12], "{out}");
    let listed = report["hosts"].as_array().unwrap();
    assert_eq!(listed[0]["result"], "serving", "{out}");
    assert_eq!(listed[0]["rollback_ms"], Value::Null, "{out}");
    assert!(
        err.contains(&format!(
            "{}: already serves sha256 {}",
            hosts.hosts[0].destination,
            &v1_sha[..12]
        )),
        "{err}"
    );
    assert_eq!(listed[1]["result"], "serving", "{out}");
    assert_eq!(listed[1]["sha256"], v1_sha.as_str(), "{out}");
    k.wait_for(HOST, "v1", Duration::from_secs(5));
    assert_eq!(
        releases(hosts.hosts[0].keter())["releases"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

/// The host's keter's `/api/apps`, read as `keter status --json` reads it.
fn keter_status(k: &Keter) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keter"))
        .args(["status", "--json", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    json(&String::from_utf8_lossy(&out.stdout))
}
