//! The persisted formats across builds (`src/formats/`): `keter --check-handover` answers with
//! the formats this build reads; with the build before this one (`KETER_BEFORE`), an in-place
//! upgrade and a crash followed by this build both take every app over, and the fixtures of
//! `tests/fixtures/formats/` are written by a real run of a build (`KETER_CAPTURE`).
//!
//! The tests that need another build are ignored by default and fail without it:
//! `KETER_BEFORE=/path/to/keter cargo test --test integration build_before -- --include-ignored`.
//! The fixtures' own tests (`src/formats/tests.rs`) always run.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;
use crate::takeover::{APPS, PAUSE, WAIT, assert_nothing_lost, deploy_three, pids, replace_binary};
use crate::traffic::Traffic;

/// The build before this one, named by `KETER_BEFORE`; a test that needs it fails without.
fn before() -> PathBuf {
    let Some(bin) = std::env::var_os("KETER_BEFORE") else {
        panic!(
            "this test compares two builds: KETER_BEFORE=/path/to/the/older/keter (build it from an older commit in a worktree of its own)"
        );
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_file(),
        "KETER_BEFORE={} is not a file",
        bin.display()
    );
    bin
}

/// This build.
fn this_build() -> PathBuf {
    env!("CARGO_BIN_EXE_keter").into()
}

/// `from` copied to a path of its own in `dir`, which the test replaces as a package upgrade
/// does.
fn binary_at(dir: &Path, from: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let path = bin.join("keter");
    replace_binary(&path, from);
    path
}

/// A keter running a copy of `from` (at `bin`, which the test replaces as a package upgrade
/// does), with three apps deployed and a client requesting them throughout.
struct ThreeApps {
    _dir: TempDir,
    bin: PathBuf,
    k: Keter,
    pids: Vec<(String, Vec<i64>)>,
    traffic: Traffic,
}

fn three_apps_on(label: &str, from: &Path) -> ThreeApps {
    let dir = TempDir::new(&format!("{label}-bin"));
    let bin = binary_at(&dir.0, from);
    let k = Keter::start_with(
        label,
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    deploy_three(&k);
    let pids = pids(&k);
    let hosts: Vec<&str> = APPS.iter().map(|(_, h)| *h).collect();
    let traffic = Traffic::start(k.addr(), &hosts, 1, 1, PAUSE);
    ThreeApps {
        _dir: dir,
        bin,
        k,
        pids,
        traffic,
    }
}

fn version_of(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_new_binary_answers_with_the_formats_it_reads() {
    let k = Keter::start("formats-answer");
    let out = std::process::Command::new(this_build())
        .arg("--check-handover")
        .arg(&k.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // What a keter that predates the ranges compares with its own formats (1 and 1).
    assert_eq!(answer["handover"], 1, "{answer}");
    assert_eq!(answer["records"], 1, "{answer}");
    assert_eq!(answer["reads_records"]["oldest"], 1, "{answer}");
    assert_eq!(
        answer["reads_records"]["newest"],
        keter::formats::records::FORMAT,
        "{answer}"
    );
    assert_eq!(answer["reads_handover"]["oldest"], 1, "{answer}");
    assert_eq!(
        answer["keter"].as_str().unwrap(),
        keter::build::VERSION,
        "{answer}"
    );
    // And the build names itself the same way everywhere.
    assert_eq!(
        version_of(&this_build()),
        format!("keter {}", keter::build::VERSION)
    );
    assert!(
        k.log().contains(&format!(
            "keter: keter {} starting on",
            keter::build::VERSION
        )),
        "{}",
        k.log()
    );
}

/// Starts `from` at a path of its own with three apps under traffic, puts `to` at that path
/// and sends SIGUSR2: every app keeps its processes and no request fails.
fn upgrade_in_place(label: &str, from: &Path, to: &Path) {
    let ThreeApps {
        _dir,
        bin,
        k,
        pids: pids_before,
        traffic,
    } = three_apps_on(label, from);
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    replace_binary(&bin, to);
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    let took = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, None);
    assert_eq!(pids(&k), pids_before, "an app was restarted:\n{}", k.log());
    let version = version_of(to);
    let line = format!("keter: upgraded in place to {version}");
    assert!(k.log().contains(&line), "no {line:?} in:\n{}", k.log());
    eprintln!(
        "SIGUSR2 from {:?} to {version:?}: {} requests, 0 failed, {} processes kept, {} ms from the signal to the new image watching",
        version_of(from),
        tally.ok,
        pids_before.iter().map(|(_, p)| p.len()).sum::<usize>(),
        took.as_millis()
    );
}

#[test]
#[ignore = "needs the build before: KETER_BEFORE=/path/to/keter"]
fn the_build_before_upgrades_in_place_to_this_one_keeping_every_app() {
    upgrade_in_place("formats-upgrade", &before(), &this_build());
}

/// Back to the build before, which cannot read what this build writes: refused.
#[test]
#[ignore = "needs the build before: KETER_BEFORE=/path/to/keter"]
fn this_build_does_not_hand_over_to_the_build_before_which_cannot_read_its_records() {
    // This build writes records of format 2; the build before reads format 1 only.
    let ThreeApps {
        _dir,
        bin,
        k,
        pids: pids_before,
        traffic,
    } = three_apps_on("formats-downgrade", &this_build());
    let keter = k.pid();
    replace_binary(&bin, &before());
    k.signal(Signal::SIGUSR2);
    k.wait_log("this keter carries on", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, None);
    assert!(
        k.log().contains(
            "records of format 1; this keter writes handover format 1 and records of format 2"
        ),
        "{}",
        k.log()
    );
    assert_eq!(k.pid(), keter);
    assert_eq!(pids(&k), pids_before, "an app was restarted:\n{}", k.log());
    assert_eq!(k.log_count("keter: upgraded in place"), 0);
}

#[test]
#[ignore = "needs the build before: KETER_BEFORE=/path/to/keter"]
fn this_build_takes_over_from_the_build_before_after_a_crash() {
    let old = before();
    let ThreeApps {
        _dir,
        bin,
        mut k,
        pids: pids_before,
        traffic,
    } = three_apps_on("formats-crash", &old);
    std::thread::sleep(Duration::from_millis(500));
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let down = Instant::now() + Duration::from_millis(10);
    replace_binary(&bin, &this_build());
    std::thread::sleep(Duration::from_millis(200));
    let up = Instant::now();
    k.launch();
    k.wait_log("keter: took over 3 apps and 4 processes", WAIT);
    let took = up.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, Some(&[(down, up)]));
    assert_eq!(pids(&k), pids_before, "an app was restarted:\n{}", k.log());
    assert!(
        !k.log().contains("its record cannot be read"),
        "{}",
        k.log()
    );
    eprintln!(
        "SIGKILL of {:?}, then {:?} started: {} requests, 0 failed, {} processes kept, {} ms from the start to taking over",
        version_of(&old),
        version_of(&this_build()),
        tally.ok,
        pids_before.iter().map(|(_, p)| p.len()).sum::<usize>(),
        took.as_millis()
    );
}

/// A background stanza that prints a line now and then.
const TICKER: &[u8] = b"#!/bin/sh\nwhile :; do echo tick; sleep 1; done\n";

/// Writes what the build `KETER_BIN` persists into `KETER_CAPTURE/records-N/` and
/// `KETER_CAPTURE/handover-N.json` (N: the format each file says): the records of an app with
/// a webapp, a background process and a retiring version, and of an app whose deploy failed;
/// the handover file of an in-place upgrade. The test's root is written `/var/lib/keter`.
#[test]
#[ignore = "writes fixtures: KETER_BIN=/path/to/keter KETER_CAPTURE=DIR"]
fn capture_format_fixtures() {
    let out = PathBuf::from(std::env::var_os("KETER_CAPTURE").expect("KETER_CAPTURE=DIR"));
    let real = PathBuf::from(std::env::var_os("KETER_BIN").expect("KETER_BIN=/path/to/keter"));
    let dir = TempDir::new("formats-capture-bin");
    let bin = binary_at(&dir.0, &real);
    let k = Keter::start_with(
        "formats-capture",
        Opts {
            binary: Some(bin.clone()),
            drain_time: 60.0,
            ..Opts::default()
        },
    );
    let deploy = |version: &str| {
        let yaml = format!(
            "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    host: web.example.com\n  - type: background\n    exec: ../dist/ticker\n"
        );
        let path = k.dir.0.join(format!("{version}.keter"));
        BundleBuilder::hello(&yaml)
            .file("dist/ticker", TICKER.to_vec(), 0o755)
            .write(&path);
        k.deploy("web", &path);
        k.wait_for("web.example.com", version, WAIT);
    };
    deploy("web1");
    let state = k.root.join("etc/state");
    // A slow request to the first version keeps it retiring (draining) after the second.
    let mut held = std::net::TcpStream::connect(k.addr()).unwrap();
    std::io::Write::write_all(
        &mut held,
        b"GET /slow?ms=30000 HTTP/1.1\r\nHost: web.example.com\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    deploy("web2");
    let path = k.dir.0.join("broken.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/missing\n    host: broken.example.com\n",
    )
    .write(&path);
    k.deploy("broken", &path);
    let deadline = Instant::now() + WAIT;
    loop {
        let read = |name: &str| fs::read_to_string(state.join(name)).unwrap_or_default();
        if read("web.json").contains("\"retiring\"") && read("broken.json").contains("\"failed\":{")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no records yet:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let root = k.root.display().to_string();
    let scrub = |text: &str| text.replace(&root, "/var/lib/keter");
    let pretty = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(&scrub(text)).unwrap();
        let format = v["format"].as_u64().unwrap();
        (format, serde_json::to_string_pretty(&v).unwrap() + "\n")
    };
    for name in ["web", "broken"] {
        let (format, text) =
            pretty(&fs::read_to_string(state.join(format!("{name}.json"))).unwrap());
        let to = out.join(format!("records-{format}"));
        fs::create_dir_all(&to).unwrap();
        fs::write(to.join(format!("{name}.json")), text).unwrap();
    }
    // The handover file: a script at the start path copies it, then runs the build.
    let copy = dir.0.join("handover.json");
    crate::takeover::script(
        &bin,
        &format!(
            "[ -n \"$KETER_HANDOVER_FD\" ] && cat /proc/self/fd/$KETER_HANDOVER_FD > {}\nexec {} \"$@\"",
            copy.display(),
            real.display()
        ),
    );
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    let (format, text) = pretty(&fs::read_to_string(&copy).unwrap());
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join(format!("handover-{format}.json")), text).unwrap();
}
