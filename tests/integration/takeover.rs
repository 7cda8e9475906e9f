//! Apps outlive keter: an in-place upgrade (SIGUSR2) and a keter killed and started again
//! both take every app over without restarting it, under continuous requests on new and on
//! kept-alive connections; what cannot be taken over is replaced before it stops; an upgrade
//! that cannot happen leaves the running keter in charge.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;
use crate::traffic::{Traffic, missing_log_lines};

pub(crate) const WAIT: Duration = Duration::from_secs(30);
pub(crate) const APPS: [(&str, &str); 3] = [
    ("a", "a.example.com"),
    ("b", "b.example.com"),
    ("c", "c.example.com"),
];
/// Between two requests of one client: enough traffic for every gap to be crossed by many
/// requests, without starving the two cores that Nginx, the apps and keter share.
pub(crate) const PAUSE: Duration = Duration::from_millis(2);

/// A background stanza that prints a numbered line every 20 ms: its lines must all arrive,
/// in order, whatever happens to keter.
const TICKER: &[u8] =
    b"#!/bin/sh\ni=0\nwhile :; do i=$((i+1)); echo \"tick $i\"; sleep 0.02; done\n";

/// Deploys the three apps (app `c` with a background ticker) and waits for them.
pub(crate) fn deploy_three(k: &Keter) {
    for (app, host) in APPS {
        if app == "c" {
            let yaml = format!(
                "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, c1, --log-requests]\n    host: {host}\n  - type: background\n    exec: ../dist/ticker\n"
            );
            let path = k.dir.0.join("c1.keter");
            BundleBuilder::hello(&yaml)
                .file("dist/ticker", TICKER.to_vec(), 0o755)
                .write(&path);
            k.deploy(app, &path);
        } else {
            k.deploy_hello(app, &format!("{app}1"), host, &["--log-requests"]);
        }
    }
    for (app, host) in APPS {
        k.wait_for(host, &format!("{app}1"), WAIT);
    }
}

/// Every app's pids (webapps and background processes) and keter's view of them.
pub(crate) fn pids(k: &Keter) -> Vec<(String, Vec<i64>)> {
    let apps = status_json(k);
    apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let pids = a["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["pid"].as_i64().unwrap_or(-1))
                .collect();
            (a["name"].as_str().unwrap().to_string(), pids)
        })
        .collect()
}

fn status_json(k: &Keter) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keter"))
        .args(["status", "--json", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "keter status failed:\n{}", k.log());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `tick N` numbers in app `c`'s log, in the order they were written.
fn ticks(root: &Path) -> Vec<u64> {
    fs::read_to_string(root.join("log/app-c.log"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(" tick ").and_then(|(_, n)| n.parse().ok()))
        .collect()
}

/// Asserts that no request failed and that every answered request was logged by its app, and
/// that the ticker's lines run on without a gap. With `gaps`, only the requests answered
/// within them must have been logged: a keter killed by SIGKILL loses what it had read from a
/// pipe and not yet written (the handover of an upgrade loses nothing), while what the apps
/// print when no keter runs stays in their pipes.
pub(crate) fn assert_nothing_lost(
    k: &Keter,
    tally: &crate::traffic::Tally,
    gaps: Option<&[(std::time::Instant, std::time::Instant)]>,
) {
    assert!(
        tally.failures.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        tally.failed(),
        tally.ok + tally.failed() as u64,
        &tally.failures[..tally.failures.len().min(20)],
        k.log()
    );
    assert!(tally.ok > 100, "too few requests: {tally:?}");
    for (app, host) in APPS {
        let ids = tally.ids(host, gaps);
        assert!(!ids.is_empty(), "{host}: no request answered");
        let missing = missing_log_lines(&k.root, app, &ids, WAIT);
        assert!(
            missing.is_empty(),
            "{app}: {} of {} answered requests are not in its log, e.g. {:?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
        if gaps.is_some() {
            let all = tally.ids(host, None);
            let lost = missing_log_lines(&k.root, app, &all, Duration::ZERO).len();
            eprintln!(
                "{app}: {} of {} request lines printed while keter was down; {lost} of {} lines lost in all (in flight in a killed keter)",
                ids.len(),
                all.len(),
                all.len()
            );
        }
    }
    let t = ticks(&k.root);
    assert!(t.len() > 10, "{t:?}");
    if gaps.is_none() {
        for w in t.windows(2) {
            assert_eq!(w[1], w[0] + 1, "a tick line is missing or out of order");
        }
    }
}

/// The build under test: `KETER_BIN`, or the one cargo built.
fn build() -> PathBuf {
    std::env::var_os("KETER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keter").into())
}

/// A copy of keter's binary that the test replaces, as a package upgrade does.
fn own_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let path = bin.join("keter");
    replace_binary(&path, &build());
    path
}

/// Puts `from` at `path` under a new inode (copy, then rename over), as dpkg does: the old
/// file lives on, deleted, as long as a process runs it.
pub(crate) fn replace_binary(path: &Path, from: &Path) {
    let tmp = path.with_extension("new");
    fs::copy(from, &tmp).unwrap();
    set_mode(&tmp, 0o755);
    fs::rename(&tmp, path).unwrap();
}

/// A script standing in for a broken new keter: `body` runs instead of it.
pub(crate) fn script(path: &Path, body: &str) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    set_mode(&tmp, 0o755);
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_killed_keter_is_started_again_and_takes_every_app_over() {
    let mut k = Keter::start("takeover-kill");
    deploy_three(&k);
    let before = pids(&k);
    let nginx = k.nginx_pid();
    let hosts: Vec<&str> = APPS.iter().map(|(_, h)| *h).collect();
    let traffic = Traffic::start(k.addr(), &hosts, 1, 1, PAUSE);
    let mut gaps = Vec::new();
    for i in 1..=10 {
        let _ = k.signal_and_wait(Signal::SIGKILL);
        // The apps print while no keter reads them.
        let down = std::time::Instant::now() + Duration::from_millis(10);
        std::thread::sleep(Duration::from_millis(200));
        // No keter runs from `down` to here.
        let up = std::time::Instant::now();
        gaps.push((down, up));
        k.launch();
        k.wait_log_count("keter: took over 3 apps and 4 processes", i, WAIT);
        // What the apps printed meanwhile reaches their logs before the next kill (which
        // would otherwise catch it in flight, read and not yet written).
        for (app, host) in APPS {
            let ids = traffic.answered_between(host, down, up);
            let missing = missing_log_lines(&k.root, app, &ids, WAIT);
            assert!(
                missing.is_empty(),
                "{app}: {} of the {} lines printed while keter was down are not in its log",
                missing.len(),
                ids.len()
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, Some(&gaps));
    assert_eq!(pids(&k), before, "an app was restarted:\n{}", k.log());
    assert_eq!(k.nginx_pid(), nginx, "the managed Nginx was restarted");
    assert_eq!(k.log_count("started the master"), 1);

    // Taken over, the apps are supervised as before: a crash is restarted (its status is not
    // known: keter is not its parent any more), a deploy and a delete work.
    let a = k.pid_of("a.example.com");
    kill(Pid::from_raw(a), Signal::SIGKILL).unwrap();
    k.wait_log(&format!("pid {a} (port"), WAIT);
    k.wait_log(
        "exited with an unknown status (an earlier keter started it)",
        WAIT,
    );
    let deadline = std::time::Instant::now() + WAIT;
    while k
        .get("a.example.com", "/pid")
        .ok()
        .filter(|r| r.status == 200)
        .is_none_or(|r| r.body.trim() == a.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a never came back:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    k.deploy_hello("b", "b2", "b.example.com", &[]);
    k.wait_for("b.example.com", "b2", WAIT);
    let c_pids = &before.iter().find(|(n, _)| n == "c").unwrap().1;
    fs::remove_file(k.incoming().join("c.keter")).unwrap();
    k.wait_stopped("c", WAIT);
    for pid in c_pids {
        assert!(wait_gone(*pid as i32, WAIT), "pid {pid} of c still runs");
    }
    assert_eq!(k.get("c.example.com", "/").unwrap().status, 404);
}

#[test]
fn in_place_upgrades_hand_every_app_over_to_the_new_binary() {
    let dir = TempDir::new("takeover-upgrade-bin");
    let bin = own_binary(&dir.0);
    let k = Keter::start_with(
        "takeover-upgrade",
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    deploy_three(&k);
    let before = pids(&k);
    let status_before = status_json(&k);
    let (keter, nginx) = (k.pid(), k.nginx_pid());
    let hosts: Vec<&str> = APPS.iter().map(|(_, h)| *h).collect();
    let traffic = Traffic::start(k.addr(), &hosts, 1, 1, PAUSE);
    for i in 1..=10 {
        // A new file at the path keter was started from: the running one is now deleted.
        replace_binary(&bin, &build());
        let exe = fs::read_link(format!("/proc/{keter}/exe")).unwrap();
        assert!(exe.to_string_lossy().ends_with("(deleted)"), "{exe:?}");
        k.signal(Signal::SIGUSR2);
        k.wait_log_count("keter: upgraded in place", i, WAIT);
        let exe = fs::read_link(format!("/proc/{keter}/exe")).unwrap();
        assert_eq!(
            exe, bin,
            "keter did not execute the new file at its start path"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, None);
    assert_eq!(k.pid(), keter);
    assert_eq!(pids(&k), before, "an app was restarted:\n{}", k.log());
    assert_eq!(k.nginx_pid(), nginx, "the managed Nginx was restarted");
    // `keter status` shows the same apps, deploys and uptimes.
    let after = status_json(&k);
    for (a, b) in status_before["apps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["apps"].as_array().unwrap())
    {
        for field in ["name", "state", "sha256", "deploy", "since", "hosts"] {
            assert_eq!(a[field], b[field], "{field} changed");
        }
        // The same processes in the same places (their usage and health checks go on).
        let places = |app: &serde_json::Value| -> Vec<String> {
            app["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    ["kind", "stanza", "port", "pid", "restarts"]
                        .map(|f| p[f].to_string())
                        .join(" ")
                })
                .collect()
        };
        assert_eq!(places(a), places(b), "processes changed");
        assert!(b["uptime_seconds"].as_u64() >= a["uptime_seconds"].as_u64());
    }
    assert_eq!(k.log_count("keter: handing 3 apps over"), 10);
    // And it deploys as before.
    k.deploy_hello("a", "a2", "a.example.com", &[]);
    k.wait_for("a.example.com", "a2", WAIT);
}

#[test]
fn a_slow_upgrade_writes_every_line_the_apps_printed_meanwhile() {
    let dir = TempDir::new("takeover-slow-bin");
    let bin = own_binary(&dir.0);
    let real = build();
    let k = Keter::start_with(
        "takeover-slow",
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    deploy_three(&k);
    let hosts: Vec<&str> = APPS.iter().map(|(_, h)| *h).collect();
    let traffic = Traffic::start(k.addr(), &hosts, 2, 2, PAUSE);
    // A new image that takes 15 s to start, as a loaded machine makes it: what the apps print
    // meanwhile (thousands of lines each, more than fit an app's share of the log writer's
    // queue) waits in their pipes and reaches the new image at once.
    script(
        &bin,
        &format!(
            "if [ \"$1\" != --check-handover ]; then sleep 15; fi\nexec {} \"$@\"",
            real.display()
        ),
    );
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, None);
}

#[test]
fn an_upgrade_that_cannot_happen_leaves_the_running_keter_in_charge() {
    let dir = TempDir::new("takeover-refused-bin");
    let bin = own_binary(&dir.0);
    let real = &build();
    let k = Keter::start_with(
        "takeover-refused",
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    k.deploy_hello("a", "a1", "a.example.com", &["--log-requests"]);
    k.wait_for("a.example.com", "a1", WAIT);
    let (keter, app) = (k.pid(), k.pid_of("a.example.com"));
    let traffic = Traffic::start(k.addr(), &["a.example.com"], 1, 1, PAUSE);
    let config = fs::read_to_string(&k.config_path).unwrap();
    type Breakage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Breakage)> = vec![
        ("cannot run", Box::new(|| fs::remove_file(&bin).unwrap())),
        (
            "--check-handover failed",
            Box::new(|| script(&bin, "echo 'Segmentation fault' >&2; exit 139")),
        ),
        (
            "does not answer --check-handover as a keter that can take over does",
            Box::new(|| script(&bin, "echo 'keter 0.0.1'")),
        ),
        (
            "reads handover format 99",
            Box::new(|| {
                script(
                    &bin,
                    r#"echo '{"keter":"9.9.9","handover":99,"records":1,"root":"/","nginx_mode":"managed"}'"#,
                )
            }),
        ),
        (
            // A binary that names the formats it reads, and not this keter's.
            "records of format 3 to 4; this keter writes handover format 1 and records of format 2",
            Box::new(|| {
                script(
                    &bin,
                    r#"echo '{"keter":"9.9.9","handover":1,"records":1,"root":"/","nginx_mode":"managed","reads_handover":{"oldest":1,"newest":3},"reads_records":{"oldest":3,"newest":4}}'"#,
                )
            }),
        ),
        (
            "restart keter to move it",
            Box::new(|| {
                replace_binary(&bin, real);
                let moved = config.replace("root: ", "root: /var/tmp/elsewhere");
                fs::write(&k.config_path, moved).unwrap();
            }),
        ),
    ];
    for (i, (why, make)) in cases.iter().enumerate() {
        make();
        k.signal(Signal::SIGUSR2);
        k.wait_log_count("this keter carries on", i + 1, WAIT);
        assert!(k.log().contains(why), "no {why:?} in:\n{}", k.log());
    }
    fs::write(&k.config_path, &config).unwrap();
    let tally = traffic.stop();
    assert!(tally.failures.is_empty(), "{:?}", tally.failures);
    assert_eq!(k.pid(), keter);
    assert_eq!(k.pid_of("a.example.com"), app);
    assert_eq!(k.log_count("keter: upgraded in place"), 0);
    // Still in charge: it deploys, and a good binary takes over after all.
    k.deploy_hello("a", "a2", "a.example.com", &[]);
    k.wait_for("a.example.com", "a2", WAIT);
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    k.wait_for("a.example.com", "a2", WAIT);
}

#[test]
fn a_new_image_that_dies_at_once_leaves_the_apps_to_the_next_keter() {
    let dir = TempDir::new("takeover-dies-bin");
    let bin = own_binary(&dir.0);
    let real = &build();
    let mut k = Keter::start_with(
        "takeover-dies",
        Opts {
            binary: Some(bin.clone()),
            ..Opts::default()
        },
    );
    deploy_three(&k);
    let before = pids(&k);
    let hosts: Vec<&str> = APPS.iter().map(|(_, h)| *h).collect();
    let traffic = Traffic::start(k.addr(), &hosts, 1, 1, PAUSE);
    // It answers the check as the real one does, and then fails to start.
    script(
        &bin,
        &format!(
            "if [ \"$1\" = --check-handover ]; then exec {} \"$@\"; fi\necho 'keter: cannot start' >&2\nexit 3",
            real.display()
        ),
    );
    k.signal(Signal::SIGUSR2);
    let status = k.wait_exited();
    assert_eq!(status.code(), Some(3), "{}", k.log());
    // Nobody reads the apps for a while; Nginx keeps serving them.
    std::thread::sleep(Duration::from_millis(500));
    replace_binary(&bin, real);
    k.launch();
    k.wait_log(
        "keter: took over 3 apps and 4 processes from an earlier run",
        WAIT,
    );
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert_nothing_lost(&k, &tally, None);
    assert_eq!(pids(&k), before, "an app was restarted:\n{}", k.log());
}

#[test]
fn a_serving_version_whose_folder_is_gone_serves_until_its_replacement_has_switched() {
    let mut k = Keter::start("takeover-no-folder");
    k.deploy_hello("a", "a1", "a.example.com", &["--log-requests"]);
    k.wait_for("a.example.com", "a1", WAIT);
    let old = k.pid_of("a.example.com");
    let traffic = Traffic::start(k.addr(), &["a.example.com"], 2, 2, PAUSE);
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let folders = k.temp_folders();
    assert_eq!(folders.len(), 1);
    fs::remove_dir_all(k.root.join("temp").join(&folders[0])).unwrap();
    k.launch();
    k.wait_deploy("a", 2, WAIT);
    k.wait_log("has lost its folder", WAIT);
    assert!(
        wait_gone(old, WAIT),
        "the leftover never stopped:\n{}",
        k.log()
    );
    let tally = traffic.stop();
    assert!(
        tally.failures.is_empty(),
        "{:?}\n{}",
        tally.failures,
        k.log()
    );
    let new = k.pid_of("a.example.com");
    assert_ne!(new, old);
    // The leftover was stopped only after Nginx routed to its replacement.
    k.wait_log(&format!("a: stopped pid {old}"), WAIT);
    let log = k.log();
    let switched = log.find("a: switched to deploy 2").unwrap();
    let stopped = log.find(&format!("a: stopped pid {old}")).unwrap();
    assert!(switched < stopped, "{log}");
}

#[test]
fn a_process_whose_pid_was_reused_is_never_signalled() {
    let mut k = Keter::start("takeover-reused");
    let yaml = "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, c1]\n    host: c.example.com\n  - type: background\n    exec: ../dist/ticker\n";
    let path = k.dir.0.join("c1.keter");
    BundleBuilder::hello(yaml)
        .file("dist/ticker", TICKER.to_vec(), 0o755)
        .write(&path);
    k.deploy("c", &path);
    k.wait_for("c.example.com", "c1", WAIT);
    let ticker = pids(&k)[0].1[0] as i32;
    let _ = k.signal_and_wait(Signal::SIGKILL);
    // Make the records say that the ticker's pid started at another time: to keter, that
    // pid now names a process of someone else's.
    let ticks = keter::procfs::start_ticks(ticker).unwrap();
    let wrong = (ticks + 1).to_string();
    let ticks = ticks.to_string();
    for file in ["etc/state/c.json", "etc/processes"] {
        let p = k.root.join(file);
        let text = fs::read_to_string(&p).unwrap();
        let changed = text
            .replacen(
                &format!("\"pid\":{ticker},\"ticks\":{ticks}"),
                &format!("\"pid\":{ticker},\"ticks\":{wrong}"),
                1,
            )
            .replacen(
                &format!("{ticker} {ticks} "),
                &format!("{ticker} {wrong} "),
                1,
            );
        assert_ne!(changed, text, "{file}: {text}");
        fs::write(&p, changed).unwrap();
    }
    k.launch();
    k.wait_log("ended while no keter watched it; starting it again", WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    let new = loop {
        let p = pids(&k)[0].1[0] as i32;
        if p > 0 && p != ticker {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(alive(new));
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(ticker), "keter signalled a process it does not own");
    kill(Pid::from_raw(-ticker), Signal::SIGKILL).unwrap();
}

/// Waits until the status interface says `app`'s deploy is at `stage`.
fn wait_stage(k: &Keter, app: &str, stage: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = status_json(k);
        let a = s["apps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == app);
        if a.is_some_and(|a| a["deploy_stage"] == stage) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app} never got to {stage}:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_deploy_under_way_during_an_upgrade_is_done_again_by_the_new_keter() {
    let k = Keter::start("takeover-upgrade-deploying");
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    let serving = k.pid_of("a.example.com");
    let traffic = Traffic::start(k.addr(), &["a.example.com"], 1, 1, PAUSE);
    // A version that takes a while to answer: the upgrade comes during its readiness.
    k.deploy_hello("a", "a2", "a.example.com", &["--delay-ms", "1500"]);
    wait_stage(&k, "a", "readiness");
    let candidate = started_pids(&k)[1];
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    k.wait_for("a.example.com", "a2", WAIT);
    let tally = traffic.stop();
    assert!(
        tally.failures.is_empty(),
        "{:?}\n{}",
        tally.failures,
        k.log()
    );
    // The candidate of before the upgrade was stopped, the new keter's own serves, and the
    // version of before it is stopped once drained.
    let started = started_pids(&k);
    assert_eq!(started.len(), 3, "{}", k.log());
    assert!(!alive(candidate));
    assert_eq!(k.pid_of("a.example.com"), started[2]);
    assert!(wait_gone(serving, WAIT));
    k.wait_temp_folders(1, WAIT);
}

/// The pids of the processes keter's log says it started, in order.
fn started_pids(k: &Keter) -> Vec<i32> {
    k.log()
        .lines()
        .filter(|l| l.contains(": started /"))
        .filter_map(|l| l.split("as pid ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn a_deploy_under_way_when_keter_is_killed_is_done_again_by_the_next_keter() {
    let mut k = Keter::start("takeover-kill-deploying");
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    let traffic = Traffic::start(k.addr(), &["a.example.com"], 1, 1, PAUSE);
    k.deploy_hello("a", "a2", "a.example.com", &["--delay-ms", "1500"]);
    wait_stage(&k, "a", "readiness");
    let candidate = started_pids(&k)[1];
    let _ = k.signal_and_wait(Signal::SIGKILL);
    k.launch();
    // The candidate that was waiting for readiness is stopped; the deploy starts again.
    assert!(wait_gone(candidate, WAIT), "{}", k.log());
    k.wait_for("a.example.com", "a2", WAIT);
    let tally = traffic.stop();
    assert!(
        tally.failures.is_empty(),
        "{:?}\n{}",
        tally.failures,
        k.log()
    );
    k.wait_temp_folders(1, WAIT);
}

/// Starts another keter on `k`'s configuration and expects it to refuse at once, naming the
/// root and the pid of `holder`; one that runs is stopped and the test fails.
fn assert_second_keter_refused(k: &Keter, holder: i32) {
    let mut child = std::process::Command::new(&k.bin)
        .arg(&k.config_path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
            panic!("a second keter ran on the root of the first:\n{}", k.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let expected = format!(
        "keter cannot run: another keter (pid {holder}) runs on the root {}",
        k.root.display()
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn a_second_keter_on_the_same_root_refuses_to_start_until_the_first_is_gone() {
    let mut k = Keter::start("root-lock");
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    let (keter, app, nginx) = (k.pid(), k.pid_of("a.example.com"), k.nginx_pid());
    assert_second_keter_refused(&k, keter);
    // The first one did not notice.
    assert_eq!(k.get("a.example.com", "/").unwrap().body.trim(), "a1");
    assert_eq!(k.pid_of("a.example.com"), app);

    // The lock is kept across an in-place upgrade.
    k.signal(Signal::SIGUSR2);
    k.wait_log("keter: upgraded in place", WAIT);
    assert_second_keter_refused(&k, keter);

    // A killed keter leaves the root free, although its app and its Nginx live on.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    assert!(alive(app) && alive(nginx));
    k.launch();
    k.wait_log(
        "keter: took over 1 apps and 1 processes from an earlier run",
        WAIT,
    );
    assert_eq!(k.pid_of("a.example.com"), app);
    assert_second_keter_refused(&k, k.pid());
}

/// A version whose certificate an earlier keter copied as `etc/certs/NAME-N/certificate.pem`
/// and `key.pem` (one pair per version, before keter kept one pair per stanza) is taken over,
/// and its site rendered again with that pair.
#[test]
fn a_version_with_certificate_copies_of_the_earlier_layout_is_taken_over() {
    let tls_port = free_port();
    let mut k = Keter::start_with(
        "certs-layout",
        Opts {
            listeners: Some(format!(
                "[{{host: 127.0.0.1, port: {{port}}}}, {{host: 127.0.0.1, port: {tls_port}, tls: true}}]"
            )),
            ..Opts::default()
        },
    );
    let (cert, key) = crate::stanzas::self_signed(&k.dir.0.join("tls"), "tls.example.com");
    let bundle = k.dir.0.join("tls.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, v1]\n    host: tls.example.com\n    ssl: {key: ../tls/key.pem, certificate: ../tls/cert.pem}\n",
    )
    .file("tls/key.pem", fs::read(key).unwrap(), 0o600)
    .file("tls/cert.pem", fs::read(cert).unwrap(), 0o644)
    .write(&bundle);
    k.deploy("tls", &bundle);
    k.wait_for("tls.example.com", "v1", WAIT);
    let _ = k.signal_and_wait(Signal::SIGKILL);
    // The copies as the earlier keter named them.
    let certs = fs::read_dir(k.root.join("etc/certs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for entry in fs::read_dir(&certs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let earlier = if name.ends_with("-key.pem") {
            "key.pem"
        } else {
            "certificate.pem"
        };
        fs::rename(&path, certs.join(earlier)).unwrap();
    }
    k.launch();
    k.wait_log("tls: site rendered again by this keter", WAIT);
    assert!(!k.log().contains("rendering the site again"), "{}", k.log());
    let conf = fs::read_to_string(k.root.join("nginx/apps/tls.conf")).unwrap();
    assert!(
        conf.contains(&format!("{}", certs.join("certificate.pem").display())),
        "{conf}"
    );
    k.wait_for("tls.example.com", "v1", WAIT);
}
