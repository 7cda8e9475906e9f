//! The commands that ask the running daemon over its control socket (README "Running keter",
//! "Releases and rollback"): `keter restart` under continuous requests, and who may ask.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::*;
use crate::traffic::Traffic;

const WAIT: Duration = Duration::from_secs(30);
const HOST: &str = "hello.example.com";
const PAUSE: Duration = Duration::from_millis(2);

/// Runs `keter ARGS -c CONFIG` as root, or as `who` (uid and gid; std drops the other groups).
fn keter_cmd(k: &Keter, args: &[&str], who: Option<(u32, u32)>) -> Output {
    let mut cmd = Command::new(&k.bin);
    cmd.args(args).arg("-c").arg(&k.config_path);
    if let Some((uid, gid)) = who {
        cmd.uid(uid).gid(gid);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An app with a webapp and a background process that runs until it is stopped.
fn deploy_with_background(k: &Keter, version: &str) {
    let bundle = k.dir.0.join(format!("{version}.keter"));
    BundleBuilder::hello(&format!(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, {version}]\n    host: {HOST}\n  - type: background\n    exec: ../dist/worker.sh\n"
    ))
    .file("dist/worker.sh", b"#!/bin/sh\nexec sleep 600\n".to_vec(), 0o755)
    .write(&bundle);
    k.deploy("hello", &bundle);
}

#[test]
fn restart_gives_every_process_a_fresh_one_without_a_failed_request() {
    let k = Keter::start("restart");
    deploy_with_background(&k, "v1");
    k.wait_for(HOST, "v1", WAIT);
    let before = k.wait_app("hello", "both processes running", WAIT, |a| {
        a.pids().len() == 2
    });
    let traffic = Traffic::start(k.addr(), &[HOST], 2, 2, PAUSE);
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let out = keter_cmd(&k, &["restart", "hello"], None);
    let took = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello: restarted"),
        "{}",
        text(&out)
    );
    assert_eq!(tally.failed(), 0, "failed requests: {:?}", tally.failures);
    assert!(tally.ok > 50, "too few requests went through: {}", tally.ok);
    let after = k.app_status("hello").unwrap();
    assert_eq!(after.deploy, Some(before.deploy.unwrap() + 1));
    assert_eq!(after.sha256, before.sha256, "the same bundle serves");
    assert_eq!(after.pids().len(), 2, "{after:?}");
    for pid in before.pids() {
        assert!(
            !after.pids().contains(&pid),
            "process {pid} was not replaced: {after:?}"
        );
    }
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    // The old processes drain and stop.
    for pid in before.pids() {
        assert!(wait_gone(pid, WAIT), "old process {pid} still runs");
    }
    k.wait_log("keter: uid 0 (root) asks: restart hello", WAIT);
    eprintln!("keter restart took {} ms", took.as_millis());
}

#[test]
fn touching_or_rescanning_an_unchanged_bundle_restarts_nothing() {
    let k = Keter::start("restart-touch");
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);
    let bundle = k.incoming().join("hello.keter");
    let f = fs::File::options().append(true).open(&bundle).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);
    k.wait_deploy_result("hello", DeployResult::Unchanged, WAIT);
    k.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.pid_of(HOST), pid, "touching the bundle restarted the app");
    assert_eq!(k.app_status("hello").unwrap().deploy, Some(1));
}

#[test]
fn restart_refuses_what_it_cannot_do() {
    let k = Keter::start("restart-refused");
    let out = keter_cmd(&k, &["restart", "nothing"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing: no such app is deployed"),
        "{}",
        text(&out)
    );
    // A newer bundle whose deploy failed is not what a restart deploys.
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let broken = k.dir.0.join("broken.keter");
    BundleBuilder::hello(&hello_yaml("v2", HOST, &["--crash"])).write(&broken);
    k.deploy("hello", &broken);
    k.wait_deploy_result("hello", DeployResult::Failed, WAIT);
    let out = keter_cmd(&k, &["restart", "hello"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the bundle serving"),
        "{}",
        text(&out)
    );
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
}

/// The uid and gid a process runs as.
fn ids_of(pid: i32) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn a_deployer_may_restart_an_app_and_an_apps_user_may_not() {
    // The postgres plugin's password file is root's alone, as an operator keeps it: the
    // deployer's command reads the configuration for the root only, and gets on.
    let secret = TempDir::new("control-access-secret");
    let password = secret.0.join("postgres-password");
    fs::write(&password, "s3cret\n").unwrap();
    fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).unwrap();
    let mut k = Keter::start_with(
        "control-access",
        Opts {
            extra: format!(
                "postgres:\n  user: keter\n  password-file: {}\n",
                password.display()
            ),
            ..Opts::default()
        },
    );
    let who = deployer();
    // incoming/ open to the deployers' group, as the package makes it; keter gives its
    // control socket that group when it starts.
    nix::unistd::chown(&k.incoming(), None, Some(who.1.into())).unwrap();
    fs::set_permissions(k.incoming(), fs::Permissions::from_mode(0o2770)).unwrap();
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);

    let out = keter_cmd(&k, &["restart", "hello"], Some(who));
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    k.wait_log(&format!("keter: uid {} (a deployer", who.0), WAIT);
    assert_ne!(
        k.pid_of(HOST),
        pid,
        "the deployer's restart restarted nothing"
    );
    let out = keter_cmd(&k, &["releases", "hello"], Some(who));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("releases kept"),
        "{}",
        text(&out)
    );

    // The app's own user is refused, and nothing happens.
    let pid = k.pid_of(HOST);
    let app = ids_of(pid);
    assert!(app.0 >= 65536, "the app runs as {app:?}");
    let out = keter_cmd(&k, &["restart", "hello"], Some(app));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only root and the deployers"),
        "{}",
        text(&out)
    );
    // A user who is neither, likewise.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let out = keter_cmd(
        &k,
        &["restart", "hello"],
        Some((nobody.uid.as_raw(), nobody.gid.as_raw())),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(k.pid_of(HOST), pid, "a refused user restarted the app");
    assert_eq!(k.app_status("hello").unwrap().deploy, Some(2));
}

/// `keter releases NAME --json`, as root.
fn releases(k: &Keter, app: &str) -> serde_json::Value {
    let out = keter_cmd(k, &["releases", app, "--json"], None);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
}

fn numbers(r: &serde_json::Value) -> Vec<u64> {
    r["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["number"].as_u64().unwrap())
        .collect()
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn rollback_under_requests_survives_a_rescan_and_a_restart_of_keter() {
    let mut k = Keter::start("rollback");
    let v1 = k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let v2 = k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
    let (sha1, sha2) = (sha256_of(&v1), sha256_of(&v2));
    let r = releases(&k, "hello");
    assert_eq!(numbers(&r), [1, 2], "{r:#}");
    assert_eq!(r["releases"][0]["ended"], "replaced");
    assert_eq!(r["releases"][1]["sha256"], sha2.as_str());
    assert_eq!(r["releases"][1]["deployed_by"], 0);
    for sha in [&sha1, &sha2] {
        let kept = k.root.join(format!("releases/hello/{sha}.keter"));
        assert_eq!(
            &sha256_of(&kept),
            sha,
            "{} is not the bundle",
            kept.display()
        );
    }

    let traffic = Traffic::start(k.addr(), &[HOST], 2, 2, PAUSE);
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let out = keter_cmd(&k, &["rollback", "hello"], None);
    let took = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let tally = traffic.stop();
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rolled back to release 1"),
        "{}",
        text(&out)
    );
    assert_eq!(tally.failed(), 0, "failed requests: {:?}", tally.failures);
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    assert_eq!(sha256_of(&k.incoming().join("hello.keter")), sha1);
    let r = releases(&k, "hello");
    assert_eq!(numbers(&r), [1, 2, 3], "{r:#}");
    assert_eq!(r["releases"][1]["ended"], "rolled-back", "{r:#}");
    assert!(
        r["releases"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("by uid 0"),
        "{r:#}"
    );
    assert_eq!(r["releases"][2]["rollback_of"], 1);
    assert_eq!(r["releases"][2]["sha256"], sha1.as_str());
    // Both bundles, each once.
    assert_eq!(
        r["releases_bytes"].as_u64().unwrap(),
        fs::metadata(&v1).unwrap().len() + fs::metadata(&v2).unwrap().len()
    );

    // The app page lists them too.
    let page = match k.status.clone().unwrap() {
        keter::status::StatusAddress::Tcp(a) => {
            keter::probe::get_tcp(a, "keter-status", "/apps/hello", WAIT)
        }
        keter::status::StatusAddress::Unix(p) => keter::probe::get_unix(&p, "/apps/hello", WAIT),
    }
    .unwrap();
    assert!(
        page.body.contains("id=\"releases\"") && page.body.contains("rolled-back"),
        "{}",
        page.body
    );

    // A rescan keeps the rolled-back release out, and so does a keter started again.
    let deploys = k.app_status("hello").unwrap().deploy;
    k.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    assert_eq!(k.app_status("hello").unwrap().deploy, deploys);
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_for(HOST, "v1", WAIT);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    let r = releases(&k, "hello");
    assert_eq!(
        numbers(&r),
        [1, 2, 3],
        "the releases did not survive: {r:#}"
    );
    // Copying the bad bundle in again is an explicit act: it deploys.
    k.deploy("hello", &v2);
    k.wait_for(HOST, "v2", WAIT);
    assert_eq!(numbers(&releases(&k, "hello")), [1, 2, 3, 4]);
    eprintln!("keter rollback took {} ms", took.as_millis());
}

#[test]
fn keep_releases_bounds_the_bundles_kept() {
    let k = Keter::start_with(
        "keep-releases",
        Opts {
            extra: "keep-releases: 2\n".into(),
            ..Opts::default()
        },
    );
    let mut bundles = Vec::new();
    for v in ["v1", "v2", "v3", "v4"] {
        bundles.push(k.deploy_hello("hello", v, HOST, &[]));
        k.wait_for(HOST, v, WAIT);
    }
    let r = releases(&k, "hello");
    assert_eq!(numbers(&r), [3, 4], "{r:#}");
    let mut kept: Vec<String> = fs::read_dir(k.root.join("releases/hello"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".keter"))
        .collect();
    kept.sort();
    let mut want: Vec<String> = bundles[2..]
        .iter()
        .map(|b| format!("{}.keter", sha256_of(b)))
        .collect();
    want.sort();
    assert_eq!(kept, want);
    // Release 1 is gone: it cannot be rolled back to; release 3 can.
    let out = keter_cmd(&k, &["rollback", "hello", "1"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no release 1 is kept"),
        "{}",
        text(&out)
    );
    let out = keter_cmd(&k, &["rollback", "hello", "3"], None);
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v3");
    // The table for people.
    let out = keter_cmd(&k, &["releases", "hello"], None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("serving (rollback to release 3)"), "{table}");
    assert!(table.contains("rolled-back"), "{table}");
}

/// While Nginx has not answered a refresh of an app's site (here maintenance on, with the
/// Nginx master stopped so that it cannot reload), the app's worker goes on: its killed
/// webapp is restarted at once, not after `reload-timeout`.
#[test]
fn a_killed_webapp_is_restarted_while_nginx_has_not_answered_its_site() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let k = Keter::start_with(
        "refresh-stuck",
        Opts {
            // Longer than the wait for the restart below: a worker that waited for Nginx
            // would restart the webapp only after it.
            reload_timeout: 40.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);
    let master = Pid::from_raw(k.nginx_pid());
    kill(master, Signal::SIGSTOP).unwrap();
    // Should an assertion fail, the master runs again, so that keter's stop can stop it.
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let _resume = Resume(master);
    let mut asked = Command::new(&k.bin);
    asked
        .args(["maintenance", "hello", "on"])
        .arg("-c")
        .arg(&k.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut asked = asked.spawn().unwrap();
    k.wait_log("hello: maintenance on", WAIT);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let restarted = k.wait_app(
        "hello",
        "its webapp restarted",
        Duration::from_secs(20),
        |s| s.restarts >= 1 && s.processes.iter().any(|p| p.pid.is_some_and(|p| p != pid)),
    );
    assert!(
        asked.try_wait().unwrap().is_none() && restarted.site_pending,
        "Nginx answered the refresh before the restart: the test proves nothing"
    );
    let fresh = restarted.processes[0].pid.unwrap();
    assert!(alive(fresh));
    // Nginx answers once its master runs again; the site it takes has the page.
    kill(master, Signal::SIGCONT).unwrap();
    let out = asked.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    assert!(!k.app_status("hello").unwrap().site_pending);
    let answer = raw_get(&k, HOST);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(alive(fresh), "the restarted webapp was stopped");
}

/// The whole answer (status line, headers, body) to `GET /` for `host`.
fn raw_get(k: &Keter, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(k.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The flag that stops [`requests`], and its thread.
type Requests = (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<(u32, u32, Vec<String>)>,
);

/// Requests for `HOST` until the returned flag is set: each must get the app (`v1`) or the
/// maintenance page; the thread returns how many got each and what else came.
fn requests(addr: std::net::SocketAddr) -> Requests {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let (mut app, mut page, mut other) = (0u32, 0u32, Vec::new());
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match keter::probe::get_tcp(addr, HOST, "/", Duration::from_secs(5)) {
                Ok(r) if r.status == 200 && r.body.trim() == "v1" => app += 1,
                Ok(r) if r.status == 503 && r.body.contains("Back at 14:00") => page += 1,
                r => other.push(format!("{r:?}")),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (app, page, other)
    });
    (stop, thread)
}

fn stopped((stop, thread): Requests) -> (u32, u32) {
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (app, page, other) = thread.join().unwrap();
    assert!(other.is_empty(), "{other:?}");
    (app, page)
}

#[test]
fn maintenance_answers_503_with_the_page_while_the_app_runs_and_survives_a_restart_of_keter() {
    let mut k = Keter::start("maintenance");
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);
    let running = requests(k.addr());
    std::thread::sleep(Duration::from_millis(200));
    let out = keter_cmd(
        &k,
        &[
            "maintenance",
            "hello",
            "on",
            "--message",
            "Back at 14:00 <b>UTC</b> & soon",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    // Nginx runs it when the command returns.
    let answer = raw_get(&k, HOST);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 60"), "{answer}");
    assert!(
        answer.contains("Back at 14:00 &lt;b&gt;UTC&lt;/b&gt; &amp; soon"),
        "{answer}"
    );
    let (app, page) = stopped(running);
    assert!(app > 10 && page > 10, "app {app}, page {page}");
    assert!(alive(pid), "the app was stopped");
    let status = k.app_status("hello").unwrap();
    assert_eq!(status.state, "running", "the app keeps running: {status:?}");
    k.wait_log("keter: uid 0 (root) asks: maintenance hello on", WAIT);

    // Kept across a restart of keter.
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_serving("hello", WAIT);
    let answer = raw_get(&k, HOST);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");

    let running = requests(k.addr());
    std::thread::sleep(Duration::from_millis(200));
    let out = keter_cmd(&k, &["maintenance", "hello", "off"], None);
    assert!(out.status.success(), "{}\n{}", text(&out), k.log());
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    let (app, page) = stopped(running);
    assert!(app > 10 && page > 10, "app {app}, page {page}");
}

/// Automatic rollback's keys for the tests: a minute's window, the least requests lowered.
fn autorollback_opts(min_requests: u64) -> Opts {
    Opts {
        extra: format!("rollback-window: 60\nrollback-min-requests: {min_requests}\n"),
        ..Opts::default()
    }
}

#[test]
fn a_release_that_crash_loops_after_its_switch_is_rolled_back_by_itself() {
    let mut k = Keter::start_with("autorollback-crash", autorollback_opts(100));
    let v1 = k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let traffic = Traffic::start(k.addr(), &[HOST], 2, 2, PAUSE);
    // Release 2 serves, then exits 3 s after each start: a crash loop after its switch.
    k.deploy_hello("hello", "v2", HOST, &["--exit-after-ms", "3000"]);
    k.wait_app("hello", "serving release 2", WAIT, |a| a.deploy == Some(2));
    let start = Instant::now();
    let first_v1 = start + k.wait_for(HOST, "v1", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let tally = traffic.stop();
    // Release 2's crashes failed requests; after the rollback's switch, none fails. (For
    // about 100 ms after a reload Nginx's previous workers still take new connections with
    // the previous configuration, whose upstream, the crashed release, is down: those
    // requests would fail without the rollback as well.)
    let after: Vec<String> = tally
        .failures
        .iter()
        .zip(&tally.failed_at)
        .filter(|(_, at)| **at >= first_v1 + Duration::from_millis(200))
        .map(|(f, at)| {
            format!(
                "{} ms after v1 first answered: {f}",
                (*at - first_v1).as_millis()
            )
        })
        .collect();
    assert!(
        after.is_empty(),
        "failed after the rollback's switch: {after:?}"
    );
    assert!(tally.ok > 50, "too few requests went through: {}", tally.ok);
    assert_eq!(sha256_of(&k.incoming().join("hello.keter")), sha256_of(&v1));
    k.wait_log("rolled back to 1 automatically: crash-looping", WAIT);
    let r = releases(&k, "hello");
    assert_eq!(numbers(&r), [1, 2, 3], "{r:#}");
    assert_eq!(r["releases"][1]["ended"], "failed-after-switch", "{r:#}");
    let reason = r["releases"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("automatically: crash-looping"), "{reason}");
    assert_eq!(r["releases"][2]["rollback_of"], 1);
    let app = k.app_json("hello").unwrap();
    assert_eq!(app["auto_rollback"]["state"], "rolled-back", "{app:#}");
    assert_eq!(app["auto_rollback"]["to"], 1, "{app:#}");
    let table = keter_cmd(&k, &["releases", "hello"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("failed-after-switch"), "{table}");

    // The rolled-back release stays out after a rescan and a keter started again.
    k.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    assert_eq!(k.app_status("hello").unwrap().deploy, Some(3));
    k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    k.wait_for(HOST, "v1", WAIT);
    assert_eq!(numbers(&releases(&k, "hello")), [1, 2, 3]);
}

/// Deploys a release of the example app that answers 500 to `percent` of its pages, and 200
/// to its health check (`/health`).
fn deploy_failing(k: &Keter, version: &str, percent: u32) {
    let bundle = k.dir.0.join(format!("hello-{version}.keter"));
    let p = percent.to_string();
    BundleBuilder::hello(&format!(
        "{}health-check-path: /health\n",
        hello_yaml(version, HOST, &["--fail-percent", &p])
    ))
    .write(&bundle);
    k.deploy("hello", &bundle);
}

#[test]
fn a_release_that_fails_its_users_is_rolled_back_on_its_error_ratio() {
    let k = Keter::start_with("autorollback-errors", autorollback_opts(100));
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let traffic = Traffic::start(k.addr(), &[HOST], 1, 1, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(2));
    // Half of release 2's answers are 500; its health check passes.
    deploy_failing(&k, "v2", 50);
    k.wait_app("hello", "serving release 2", WAIT, |a| a.deploy == Some(2));
    k.wait_for(HOST, "v1", Duration::from_secs(60));
    let tally = traffic.stop();
    assert!(tally.failed() > 0, "release 2 failed nothing");
    k.wait_log("rolled back to 1 automatically", WAIT);
    let r = releases(&k, "hello");
    assert_eq!(r["releases"][1]["ended"], "failed-after-switch", "{r:#}");
    let reason = r["releases"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("requests failed (5xx"), "{reason}");
    assert_eq!(r["releases"][2]["rollback_of"], 1);
}

#[test]
fn a_release_with_too_few_requests_is_not_rolled_back_on_its_errors() {
    let k = Keter::start_with(
        "autorollback-few",
        Opts {
            // The window outlasts the first look at the requests, ten seconds after the
            // switch (`LOOK` in src/app/autorollback.rs), by two seconds.
            extra: "rollback-window: 12\nrollback-min-requests: 100\n".into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    deploy_failing(&k, "v2", 100);
    k.wait_app("hello", "serving release 2", WAIT, |a| a.deploy == Some(2));
    // 30 requests, every one answered 500: fewer than rollback-min-requests.
    for _ in 0..30 {
        assert_eq!(k.get(HOST, "/").unwrap().status, 500);
    }
    // They all count: the window was still open.
    assert_eq!(
        k.log_count("release 2 passed its rollback window"),
        0,
        "{}",
        k.log()
    );
    k.wait_log(
        "release 2 passed its rollback window",
        Duration::from_secs(40),
    );
    assert_eq!(numbers(&releases(&k, "hello")), [1, 2]);
    assert_eq!(k.app_status("hello").unwrap().deploy, Some(2));
    assert_eq!(k.log_count("rolled back to 1"), 0, "{}", k.log());
}
