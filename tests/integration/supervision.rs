//! Supervision: crash restarts with backoff, process groups, running as another user,
//! background stanzas, log files, and a daemon that is killed and comes back.

use std::fs;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const HOST: &str = "hello.example.com";
const WAIT: Duration = Duration::from_secs(20);

fn port_of(k: &Keter, host: &str) -> String {
    let env = k.get(host, "/env").unwrap().body;
    env.lines()
        .find_map(|l| l.strip_prefix("PORT="))
        .unwrap_or_else(|| panic!("no PORT in {env}"))
        .to_string()
}

/// Waits until `host` answers from a process other than `old_pid`; returns the new pid.
fn wait_new_pid(k: &Keter, host: &str, old_pid: i32) -> (i32, Duration) {
    let start = Instant::now();
    loop {
        if let Ok(r) = k.get(host, "/pid")
            && r.status == 200
            && let Ok(pid) = r.body.trim().parse::<i32>()
            && pid != old_pid
        {
            return (pid, start.elapsed());
        }
        assert!(start.elapsed() < WAIT, "never came back:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn apps_inherit_no_descriptor_of_keter_or_of_each_other() {
    let k = Keter::start("fds");
    // Started at the same moment, so that one app's spawn races the other's pipes.
    let a = k.dir.0.join("a.keter");
    let b = k.dir.0.join("b.keter");
    BundleBuilder::hello(&hello_yaml("a", "a.example.com", &[])).write(&a);
    BundleBuilder::hello(&hello_yaml("b", "b.example.com", &[])).write(&b);
    k.deploy("a", &a);
    k.deploy("b", &b);
    k.wait_for("a.example.com", "a", WAIT);
    k.wait_for("b.example.com", "b", WAIT);
    for host in ["a.example.com", "b.example.com"] {
        let fds = k.get(host, "/fds").unwrap().body;
        // The listening socket, the connection being served, and the folder being listed.
        for line in fds.lines() {
            let target = line.split_once(' ').map_or("", |(_, t)| t);
            assert!(
                target.starts_with("socket:") || target.starts_with("/proc/"),
                "{host} inherited {line}:\n{fds}"
            );
        }
    }
}

#[test]
fn a_killed_app_comes_back_on_the_same_port() {
    let k = Keter::start("kill9");
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let port = port_of(&k, HOST);
    let pid = k.pid_of(HOST);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let (new_pid, took) = wait_new_pid(&k, HOST, pid);
    eprintln!("crash to serving again: {took:?}");
    assert_eq!(
        port_of(&k, HOST),
        port,
        "the port changed across the restart"
    );
    assert!(!alive(pid));
    assert!(alive(new_pid));
    let status = k.wait_restarts("hello", 1, WAIT);
    assert_eq!(status.pids(), vec![new_pid], "{status:?}");
    k.wait_log("exited with killed by SIGKILL", WAIT);
    // The Nginx file was not touched: the same deploy serves.
    assert_eq!(status.deploy, Some(1), "{status:?}");
}

#[test]
fn a_crash_looping_app_backs_off_and_is_reported() {
    let k = Keter::start("crashloop");
    k.deploy_hello("hello", "v1", HOST, &["--crash-after-first-run"]);
    k.wait_for(HOST, "v1", WAIT);
    let _ = k.get(HOST, "/exit");
    k.wait_log("crash-looping (5 failures in a row)", WAIT);
    let log = k.log();
    // The delays double: 100, 200, 400, 800, 1600 ms ...
    let delays: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("restarting in ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(&delays[..5], &[100, 200, 400, 800, 1600], "{log}");
    // ... and so do the times between the exits: no hot loop.
    let times: Vec<Duration> = log
        .lines()
        .filter(|l| l.contains("restarting in"))
        .map(|l| parse_time(&l[1..24]))
        .collect();
    // A line's time is when it was written, a little after the exit that the delay counts
    // from (a few ms on a loaded machine): 10 ms of slack, far below any hot loop.
    let slack = Duration::from_millis(10);
    for (i, w) in times.windows(2).enumerate() {
        let gap = w[1] - w[0];
        let expected = Duration::from_millis(delays[i]);
        assert!(
            gap + slack >= expected,
            "restart {i} came after {gap:?}, before its {expected:?} delay"
        );
    }
    let exits_before = k.log_count("exited with exit code 4");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        k.log_count("exited with exit code 4") <= exits_before + 1,
        "still restarting quickly"
    );
}

/// Seconds since midnight of a log timestamp `2026-11-27T13:59:34.710`.
fn parse_time(t: &str) -> Duration {
    let (h, m, s) = (&t[11..13], &t[14..16], &t[17..23]);
    let secs: f64 = h.parse::<f64>().unwrap() * 3600.0
        + m.parse::<f64>().unwrap() * 60.0
        + s.parse::<f64>().unwrap();
    Duration::from_secs_f64(secs)
}

#[test]
fn a_wrapper_script_leaves_nothing_behind() {
    let k = Keter::start("wrapper");
    // The wrapper starts the app in the background and waits, without exec: the app and its
    // own child (`--spawn-child`) are grandchildren of keter.
    let script =
        b"#!/bin/sh\n./dist/hello --version-string wrapped --spawn-child &\nwait\n".to_vec();
    let bundle = k.dir.0.join("wrapped.keter");
    BundleBuilder::hello("exec: ../dist/run.sh\nhost: hello.example.com\n")
        .file("dist/run.sh", script, 0o755)
        .write(&bundle);
    k.deploy("hello", &bundle);
    k.wait_for(HOST, "wrapped", WAIT);
    let app = k.pid_of(HOST);
    let pgid = nix::unistd::getpgid(Some(Pid::from_raw(app)))
        .unwrap()
        .as_raw();
    assert_ne!(pgid, app, "the app should be in its wrapper's group");
    let members = keter::procfs::group_members(pgid);
    assert!(
        members.len() >= 3,
        "wrapper, app and its child expected: {members:?}"
    );
    fs::remove_file(k.incoming().join("hello.keter")).unwrap();
    k.wait_stopped("hello", WAIT);
    assert!(
        keter::procfs::group_members(pgid).is_empty(),
        "left behind: {:?}",
        keter::procfs::group_members(pgid)
    );
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_after_stop_timeout() {
    let k = Keter::start_with(
        "ignoreterm",
        Opts {
            stop_timeout: 1.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &["--ignore-term"]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);
    let start = Instant::now();
    fs::remove_file(k.incoming().join("hello.keter")).unwrap();
    k.wait_log("SIGKILL after stop-timeout", WAIT);
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert!(wait_gone(pid, Duration::from_secs(5)));
}

#[test]
fn app_logs_rotate_at_the_size_limit() {
    let k = Keter::start_with(
        "rotate",
        Opts {
            extra: "log-rotate-bytes: 4000\nlog-rotate-keep: 3\n".into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    assert_eq!(
        k.get(HOST, "/print?n=300").unwrap().body.trim(),
        "printed 300"
    );
    let log_dir = k.root.join("log");
    let deadline = Instant::now() + WAIT;
    while !log_dir.join("app-hello.log.3").exists() {
        assert!(Instant::now() < deadline, "no rotation happened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !log_dir.join("app-hello.log.4").exists(),
        "more than log-rotate-keep files"
    );
    for i in 1..=3 {
        let f = log_dir.join(format!("app-hello.log.{i}"));
        let len = fs::metadata(&f).unwrap().len();
        assert!(
            (4000..4200).contains(&len),
            "{} is {len} bytes",
            f.display()
        );
        let text = fs::read_to_string(&f).unwrap();
        // Every line is whole and timestamped.
        assert!(
            text.lines()
                .all(|l| l.starts_with("20") && l.ends_with('x')),
            "{text}"
        );
    }
}

#[test]
fn background_stanzas_are_supervised_with_restart_count() {
    let k = Keter::start("background");
    let worker =
        b"#!/bin/sh\necho \"worker $$ ran\"\ntouch \"ran-$$\"\nsleep 0.2\nexit 1\n".to_vec();
    let bundle = k.dir.0.join("bg.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, bg]\n    host: hello.example.com\n  - type: background\n    exec: ../dist/worker.sh\n    restart-count: 2\n    restart-delay-seconds: 1\n",
    )
    .file("dist/worker.sh", worker, 0o755)
    .write(&bundle);
    k.deploy("hello", &bundle);
    k.wait_for(HOST, "bg", WAIT);
    k.wait_log("its restart-count is used up, it stays stopped", WAIT);
    let dir = k.root.join("temp").join(&k.temp_folders()[0]);
    let runs = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ran-"))
        .count();
    assert_eq!(runs, 3, "one run and two restarts");
    // No port and no Nginx file of its own; the webapp still serves.
    let conf = fs::read_to_string(k.root.join("nginx/apps/hello.conf")).unwrap();
    assert_eq!(conf.matches("upstream keter_").count(), 1, "{conf}");
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "bg");
    let app_log = fs::read_to_string(k.root.join("log/app-hello.log")).unwrap();
    assert_eq!(app_log.matches("worker ").count(), 3, "{app_log}");
}

#[test]
fn apps_run_as_the_setuid_user_and_cannot_write_keters_folders() {
    let k = Keter::start_with(
        "setuid",
        Opts {
            extra: "setuid: nobody\n".into(),
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let who = k.get(HOST, "/whoami").unwrap().body;
    let uid = nobody.uid.as_raw();
    assert!(
        who.contains(&format!("Uid: {uid} {uid} {uid} {uid}")),
        "{who}"
    );
    let gid = nobody.gid.as_raw();
    assert!(
        who.contains(&format!("Gid: {gid} {gid} {gid} {gid}")),
        "{who}"
    );
    assert!(!who.contains("Groups: 0"), "root's groups kept: {who}");
    let env = k.get(HOST, "/env").unwrap().body;
    assert!(
        env.contains(&format!("HOME={}", nobody.dir.display())),
        "{env}"
    );

    // Its own folder is its own...
    assert_eq!(
        k.get(HOST, "/write?path=mine.txt").unwrap().body.trim(),
        "ok"
    );
    let folder = k.root.join("temp").join(&k.temp_folders()[0]);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&folder).unwrap().uid(), uid);
    // ... keter's are not.
    for target in ["incoming/x.keter", "etc/x", "log/x", "nginx/apps/x.conf"] {
        let path = k.root.join(target);
        let answer = k
            .get(HOST, &format!("/write?path={}", path.display()))
            .unwrap()
            .body;
        assert!(
            answer.starts_with("error: Permission denied"),
            "{target}: {answer}"
        );
        assert!(!path.exists());
    }
}

#[test]
fn a_killed_keter_without_records_stops_the_leftovers_and_deploys_again() {
    let mut k = Keter::start("keter-kill9");
    k.deploy_hello("a", "a1", "a.example.com", &["--spawn-child"]);
    k.deploy_hello("b", "b1", "b.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    k.wait_for("b.example.com", "b1", WAIT);
    let old_a = k.pid_of("a.example.com");
    let old_b = k.pid_of("b.example.com");
    let journal = fs::read_to_string(k.root.join("etc/processes")).unwrap();
    assert!(journal.contains(&format!("{old_a} ")), "{journal}");
    assert!(journal.contains(&format!("{old_b} ")), "{journal}");

    let _ = k.signal_and_wait(Signal::SIGKILL);
    // The apps and the managed Nginx outlive it.
    let old_nginx = k.nginx_pid();
    assert!(alive(old_a) && alive(old_b) && alive(old_nginx));
    // Without the apps' records (a keter of before records, or records that do not read), the
    // journal of process groups still says what ran: it is stopped, not taken over.
    fs::write(k.root.join("etc/state/a.json"), "not a record").unwrap();
    fs::remove_file(k.root.join("etc/state/b.json")).unwrap();
    k.launch();
    k.wait_for("a.example.com", "a1", WAIT);
    k.wait_for("b.example.com", "b1", WAIT);
    k.wait_log("stopped 2 process groups left by an earlier run", WAIT);
    k.wait_log("a: its record cannot be read", WAIT);
    for pid in [old_a, old_b] {
        assert!(wait_gone(pid, Duration::from_secs(5)), "pid {pid} survived");
    }
    // Exactly one app process per app, and one Nginx master (the one left running, taken
    // over).
    let ours: Vec<i32> = processes_under(&k.root, "hello");
    assert_eq!(ours.len(), 2, "{ours:?}");
    let masters = processes_under_cmdline("nginx: master process", &k.root.join("nginx"));
    assert_eq!(masters, [old_nginx]);
    assert_eq!(k.temp_folders().len(), 2);
}

/// Live processes named `comm` whose working folder is under `root`.
fn processes_under(root: &std::path::Path, comm: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(root)))
        .filter(|pid| alive(*pid))
        .collect()
}

/// Live processes whose command line contains both `title` and `path`.
fn processes_under_cmdline(title: &str, path: &std::path::Path) -> Vec<i32> {
    let path = path.display().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains(title) && c.contains(&path)
            })
        })
        .filter(|pid| alive(*pid))
        .collect()
}

#[test]
fn the_serving_version_is_restarted_while_a_slow_deploy_waits_for_readiness() {
    let k = Keter::start_with(
        "slow-deploy-restart",
        Opts {
            readiness_timeout: 60.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.pid_of(HOST);
    // v2 takes 8 s to listen; v1 is killed while keter waits for it.
    k.deploy_hello("hello", "v2", HOST, &["--delay-ms", "8000"]);
    k.wait_app("hello", "waiting for v2 to get ready", WAIT, |s| {
        s.deploy_stage.as_deref() == Some("readiness")
    });
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let (again, _) = wait_new_pid(&k, HOST, pid);
    let status = k.app_status("hello").unwrap();
    assert_eq!(
        status.deploy,
        Some(1),
        "v1 was not restarted before v2 was ready: {status:?}\n{}",
        k.log()
    );
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
    assert!(alive(again));
    // And the deploy goes on.
    k.wait_for(HOST, "v2", Duration::from_secs(60));
}

#[test]
fn a_restart_that_cannot_start_the_process_follows_its_restart_count() {
    let k = Keter::start("restart-spawn-fails");
    let worker = b"#!/bin/sh\nexec sleep 3600\n".to_vec();
    let bundle = k.dir.0.join("bg.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, bg]\n    host: hello.example.com\n  - type: background\n    exec: ../dist/worker.sh\n    restart-count: 2\n    restart-delay-seconds: 1\n",
    )
    .file("dist/worker.sh", worker, 0o755)
    .write(&bundle);
    k.deploy("hello", &bundle);
    k.wait_for(HOST, "bg", WAIT);
    let log = k.log();
    let line = log
        .lines()
        .find(|l| l.contains("(background stanza 0)") && l.contains(" as pid "))
        .unwrap_or_else(|| panic!("no start line of the worker:\n{log}"));
    let pid: i32 = line
        .split(" as pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    // Its executable disappears, then it exits: every restart fails to start it.
    let dir = k.root.join("temp").join(&k.temp_folders()[0]);
    fs::remove_file(dir.join("dist/worker.sh")).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    k.wait_log("restart of background stanza 0 failed: cannot start", WAIT);
    k.wait_log("its restart-count is used up, it stays stopped", WAIT);
    let failed = k.log_count("restart of background stanza 0 failed");
    assert_eq!(failed, 2, "{}", k.log());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(k.log_count("restart of background stanza 0 failed"), failed);
    // No restart started anything, so none is counted.
    let report = crate::status::json(&k, "/api/apps/hello");
    let worker = &report["processes"][0];
    assert_eq!(worker["kind"], "background");
    assert_eq!(worker["pid"], serde_json::Value::Null);
    assert_eq!(worker["restarts"], 0, "{report}");
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "bg");
}

#[test]
fn a_stop_during_restart_delays_ends_at_once_and_leaves_nothing() {
    // Long enough that a stop that waited for it would outlast the harness's wait.
    let mut k = Keter::start_with(
        "stop-in-backoff",
        Opts {
            stop_timeout: 5.0,
            readiness_timeout: 120.0,
            ..Opts::default()
        },
    );
    // A webapp that crashes at every start after its first: it backs off, doubling.
    k.deploy_hello("web", "w1", "web.example.com", &["--crash-after-first-run"]);
    // A background stanza that starts a grandchild and exits, restarted every 10 minutes.
    let worker = b"#!/bin/sh\nsleep 3600 &\necho \"worker $$ ran\"\nexit 1\n".to_vec();
    let bundle = k.dir.0.join("bg.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, bg]\n    host: bg.example.com\n  - type: background\n    exec: ../dist/worker.sh\n    restart-count: unlimited\n    restart-delay-seconds: 600\n",
    )
    .file("dist/worker.sh", worker, 0o755)
    .write(&bundle);
    k.deploy("bg", &bundle);
    k.wait_for("web.example.com", "w1", WAIT);
    k.wait_for("bg.example.com", "bg", WAIT);
    k.wait_log("bg: pid", WAIT);
    k.wait_log("restarting in 600000 ms", WAIT);
    // A first deploy still waiting for its webapp, whose background stanza waits to restart.
    let slow = k.dir.0.join("slow.keter");
    BundleBuilder::hello(
        "stanzas:
  - type: webapp
    exec: ../dist/hello
    args: [--version-string, slow, --delay-ms, '600000']
    host: slow.example.com
  - type: background
    exec: ../dist/worker.sh
    restart-count: unlimited
    restart-delay-seconds: 600
",
    )
    .file(
        "dist/worker.sh",
        b"#!/bin/sh
echo \"worker $$ ran\"\nexit 1\n"
            .to_vec(),
        0o755,
    )
    .write(&slow);
    k.deploy("slow", &slow);
    k.wait_log_count("restarting in 600000 ms", 2, WAIT);
    let _ = k.get("web.example.com", "/exit");
    k.wait_state("web", "crash-looping", WAIT);
    let keter_pid = k.pid();
    let status = k.signal_and_wait(Signal::SIGTERM);
    assert!(status.success(), "{status}:\n{}", k.log());
    assert!(k.log().contains("keter: stopped"), "{}", k.log());
    // No process of either app, nor the grandchild, is left.
    for comm in ["hello", "sleep", "worker.sh"] {
        let left = processes_under(&k.root, comm);
        assert!(
            left.is_empty(),
            "{comm} {left:?} left after the stop:\n{}",
            k.log()
        );
    }
    assert!(!alive(keter_pid));
    // Nothing is left for a later keter to take over.
    let records: Vec<_> = fs::read_dir(k.root.join("etc/state"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(records.is_empty(), "records left: {records:?}");
    let groups = fs::read_to_string(k.root.join("etc/processes")).unwrap_or_default();
    assert!(
        groups
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')),
        "process groups left in etc/processes: {groups}"
    );
    assert!(
        fs::read_dir(k.root.join("nginx/apps"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn a_test_daemon_killed_by_its_test_leaves_no_process_or_user_behind() {
    let mut k = Keter::start("harness-cleanup");
    k.deploy_hello("left", "l1", "left.example.com", &["--spawn-child"]);
    k.wait_for("left.example.com", "l1", WAIT);
    let (app, nginx) = (k.pid_of("left.example.com"), k.nginx_pid());
    let users: Vec<String> = fs::read_to_string(k.root.join("etc/app-users"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    // keter dies and leaves its app and Nginx serving, as it means to; the handle cleans up.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let root = k.root.clone();
    drop(k);
    assert!(wait_gone(app, WAIT), "the app {app} is left");
    assert!(wait_gone(nginx, WAIT), "the Nginx master {nginx} is left");
    assert!(processes_under(&root, "sleep").is_empty());
    for user in users {
        assert!(
            nix::unistd::User::from_name(&user).unwrap().is_none(),
            "the user {user} is left"
        );
    }
}

/// Sets the soft limit of open files of process `pid`; returns the limits it had.
fn set_open_files(pid: i32, soft: u64) -> (u64, u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes the structs it is given; reading first, then setting.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) },
        0
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    (old.rlim_cur, old.rlim_max)
}

/// The lowest descriptor number process `pid` does not use: the next one it would open.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// keter cannot start an app's worker for a moment (out of descriptors: it cannot open the
/// app's log): it says so, tries again with a backoff, and the bundle deploys once it can,
/// without a SIGHUP.
#[test]
fn a_worker_that_cannot_start_is_tried_again_without_a_sighup() {
    let k = Keter::start("worker-retry");
    let pid = k.pid();
    // Not one more descriptor: the next file keter opens fails with EMFILE.
    let (soft, _) = set_open_files(pid, lowest_free_fd(pid));
    k.deploy_hello("late", "v1", "late.example.com", &[]);
    k.wait_log("late: cannot start its worker", WAIT);
    set_open_files(pid, soft);
    k.wait_for("late.example.com", "v1", WAIT);
    assert!(k.log().contains("keter tries again in 1 s"), "{}", k.log());
}

/// keter raises its own soft limit of open files to the hard one (systemd gives services
/// 1024), and gives its apps the one it was started with, also after an in-place upgrade
/// (whose new image finds the limit raised already).
#[test]
fn apps_start_with_the_open_files_limit_keter_was_started_with() {
    let k = Keter::start_with(
        "open-files",
        Opts {
            open_files: Some((1024, 4096)),
            ..Opts::default()
        },
    );
    let started = (String::from("1024"), String::from("4096"));
    let raised = (String::from("4096"), String::from("4096"));
    assert_eq!(open_files(k.pid()), raised);
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    assert_eq!(open_files(k.pid_of(HOST)), started);
    assert_eq!(
        open_files(k.nginx_pid()),
        raised,
        "Nginx wants many descriptors"
    );
    k.signal(Signal::SIGUSR2);
    k.wait_log_count("keter: upgraded in place", 1, WAIT);
    assert_eq!(open_files(k.pid()), raised);
    k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
    assert_eq!(open_files(k.pid_of(HOST)), started);
}

/// Raw control characters in `bytes`, named: what must never reach a terminal or the journal.
fn raw_controls(bytes: &[u8]) -> Vec<&'static str> {
    let mut found = Vec::new();
    for (needle, name) in [
        (&b"\x1b"[..], "ESC"),
        (b"\x07", "BEL"),
        (b"\x00", "NUL"),
        (b"\x7f", "DEL"),
        (b"\xc2\x9b", "C1 CSI"),
    ] {
        if bytes.windows(needle.len()).any(|w| w == needle) {
            found.push(name);
        }
    }
    found
}

/// A bundle whose program prints escape sequences (window title, clear screen, hidden text,
/// an OSC 52 clipboard write, BEL), a NUL followed by a journal priority, and a C1 CSI, then
/// exits before it listens.
fn printing_bundle(k: &Keter) -> std::path::PathBuf {
    let path = k.dir.0.join("esc.keter");
    let payload = b"title \x1b]0;owned\x07 clear \x1b[2J hidden \x1b[8m gone\n\
        clip \x1b]52;c;ZXZpbA==\x07 bell \x07\n\
        nul \x00<3>forged entry\n\
        c1 \xc2\x9b2J csi\n";
    BundleBuilder::new()
        .file(
            "config/keter.yaml",
            b"exec: ../run.sh\nhost: esc.example.com\n".to_vec(),
            0o644,
        )
        .file(
            "run.sh",
            b"#!/bin/sh\ncat \"$(dirname \"$0\")/payload\"\nsleep 0.3\nexit 3\n".to_vec(),
            0o755,
        )
        .file("payload", payload.to_vec(), 0o644)
        .write(&path);
    path
}

/// Waits until `file` contains `needle`; returns its bytes.
fn wait_contains(k: &Keter, file: &std::path::Path, needle: &str) -> Vec<u8> {
    let start = Instant::now();
    loop {
        let bytes = fs::read(file).unwrap_or_default();
        if String::from_utf8_lossy(&bytes).contains(needle) {
            return bytes;
        }
        assert!(
            start.elapsed() < WAIT,
            "{} never had {needle:?}:\n{}",
            file.display(),
            k.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Nothing an app prints reaches a terminal or the journal raw: not `keter status` (its last
/// error quotes the app's last lines), not keter's own log (a readiness failure quotes them),
/// not the app's log file; with `rotate-logs: false`, no NUL or ESC reaches keter's stderr
/// and every app line carries its `app-NAME>` prefix, even as journald splits records at NUL.
#[test]
fn escape_sequences_an_app_prints_reach_no_terminal_and_no_journal_raw() {
    let k = Keter::start("escapes");
    k.deploy("esc", &printing_bundle(&k));
    let report = crate::status::wait_state(&k, "esc", "failed");
    let log_file = k.root.join("log/app-esc.log");
    let written = wait_contains(&k, &log_file, "forged entry");
    assert_eq!(
        raw_controls(&written),
        Vec::<&str>::new(),
        "log/app-esc.log"
    );
    assert!(
        String::from_utf8_lossy(&written).contains("clip \\x1b]52;c;ZXZpbA==\\x07 bell \\x07"),
        "{}",
        String::from_utf8_lossy(&written)
    );
    let status = std::process::Command::new(&k.bin)
        .args(["status", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert_eq!(
        raw_controls(&status.stdout),
        Vec::<&str>::new(),
        "keter status"
    );
    assert_eq!(
        raw_controls(&status.stderr),
        Vec::<&str>::new(),
        "keter status"
    );
    let json = std::process::Command::new(&k.bin)
        .args(["status", "--json", "-c"])
        .arg(&k.config_path)
        .output()
        .unwrap();
    assert_eq!(
        raw_controls(&json.stdout),
        Vec::<&str>::new(),
        "keter status --json"
    );
    assert_eq!(
        raw_controls(&fs::read(&k.log_path).unwrap()),
        Vec::<&str>::new(),
        "keter's stderr"
    );
    // The lines the app printed are there, written out, wherever they were quoted.
    let table = String::from_utf8_lossy(&status.stdout);
    let quoted = report["last_error"]
        .as_str()
        .unwrap_or("")
        .contains("forged");
    assert!(
        !quoted || table.contains("\\x1b]52;c;ZXZpbA=="),
        "{table}\n{report}"
    );

    // rotate-logs: false: the app's lines go to keter's stderr, that is the journal.
    let k = Keter::start_with(
        "escapes-stderr",
        Opts {
            extra: "rotate-logs: false\n".into(),
            ..Opts::default()
        },
    );
    k.deploy("esc", &printing_bundle(&k));
    crate::status::wait_state(&k, "esc", "failed");
    let stderr = wait_contains(&k, &k.log_path, "c1 ");
    assert_eq!(raw_controls(&stderr), Vec::<&str>::new(), "keter's stderr");
    // journald ends a record at a newline or a NUL: every record with the app's text must be
    // one of keter's own lines (`[... LEVEL]`) or carry the app's prefix.
    let text = String::from_utf8_lossy(&stderr);
    for record in text.split(['\n', '\0']) {
        if record.contains("forged entry") || record.contains("ZXZpbA==") {
            assert!(
                record.starts_with("app-esc> ") || record.starts_with('['),
                "a record without the app's prefix: {record:?}\n{text}"
            );
        }
    }
    assert!(text.contains("app-esc> "), "{text}");
    assert!(text.contains("nul \\x00<3>forged entry"), "{text}");
}

/// What the squatter answers: a request for the shop that gets it went to the wrong program.
const SQUATTED: &str = "SQUATTED-by-another-app";

/// The real uid and gid of a process (`/proc/PID/status`).
fn ids_of(pid: i32) -> (u32, u32) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("Uid:"), field("Gid:"))
}

/// Starts, as `uid`:`gid`, the example app at `exe` binding `port` again and again until it
/// gets it, answering `SQUATTED`.
fn squat(exe: &std::path::Path, port: &str, uid: u32, gid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(exe)
        .args(["--version-string", SQUATTED, "--wait-for-port"])
        .env_clear()
        .env("PORT", port)
        .current_dir(exe.parent().unwrap())
        .uid(uid)
        .gid(gid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_port_taken_while_a_webapp_is_down_gets_none_of_its_users() {
    const SHOP: &str = "shop.example.com";
    let mut k = Keter::start("port-squat");
    k.deploy_hello("shop", "shop-v1", SHOP, &[]);
    k.deploy_hello("other", "other-v1", "other.example.com", &[]);
    k.wait_for(SHOP, "shop-v1", WAIT);
    k.wait_for("other.example.com", "other-v1", WAIT);
    // The attacker is another app: a process with that app's uid and gid, running its own copy
    // of the example app.
    let other = k.pid_of("other.example.com");
    let (uid, gid) = ids_of(other);
    assert_ne!(uid, ids_of(k.pid_of(SHOP)).0, "the apps share a uid");
    let user = nix::unistd::User::from_uid(uid.into())
        .unwrap()
        .unwrap()
        .name;
    let exe = fs::read_link(format!("/proc/{other}/exe")).unwrap();
    let mut squatters = Vec::new();
    let mut taken = Vec::new();
    // Each round kills the shop while a squatter waits for its port; the second and third
    // find the ports squatted before still held.
    for round in 0..3 {
        let port = port_of(&k, SHOP);
        let pid = k.pid_of(SHOP);
        // Binding without pause from before the kill, it has the port a moment after the
        // shop lets go of it, long before the shop's restart delay (100 ms) is over.
        let squatter = squat(&exe, &port, uid, gid);
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        loop {
            match keter::probe::get_tcp(addr, SHOP, "/", Duration::from_secs(2)) {
                Ok(r) if r.body.trim() == SQUATTED => break,
                Ok(r) if r.body.trim() == "shop-v1" && !alive(pid) => {
                    panic!(
                        "round {round}: the shop got port {port} back before the squatter: the test proves nothing"
                    )
                }
                _ => {}
            }
            assert!(
                start.elapsed() < WAIT,
                "round {round}: the squatter never got port {port}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // keter starts the shop again on another port (today's keter on the squatted port,
        // where it cannot bind). Once Nginx has the site with that port, no request for the
        // shop may reach the squatter.
        k.wait_app("shop", "started again and routed to", WAIT, |s| {
            s.pids().iter().any(|p| *p != pid) && !s.site_pending
        });
        let start = Instant::now();
        loop {
            let r = k.get(SHOP, "/").unwrap();
            assert_ne!(
                r.body.trim(),
                SQUATTED,
                "round {round}: Nginx sent a request for {SHOP} to the program of uid {uid} that took its port {port}:\n{}",
                k.log()
            );
            if r.status == 200 && r.body.trim() == "shop-v1" {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "round {round}: the shop never served again: {r:?}\n{}",
                k.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..50 {
            assert_eq!(k.get(SHOP, "/").unwrap().body.trim(), "shop-v1");
        }
        let moved = port_of(&k, SHOP);
        assert_ne!(
            moved, port,
            "round {round}: the shop serves on the squatted port"
        );
        assert!(
            !taken.contains(&moved),
            "round {round}: port {moved}, still squatted, was handed out again"
        );
        // The log names who took the port.
        k.wait_log(
            &format!(
                "shop: port {port} of webapp 0 is held by another program (uid {uid} ({user}), pid {}",
                squatter.id()
            ),
            WAIT,
        );
        taken.push(port);
        squatters.push(squatter);
    }

    // How long each squat lasted, from the shop's exit to Nginx routing elsewhere (for the
    // eye, with --nocapture; README "Supervision" states the bound).
    for line in k.log().lines().filter(|l| {
        l.contains("shop: pid") || l.contains("held by") || l.contains("shop: Nginx routes")
    }) {
        eprintln!("{line}");
    }

    // The record written after the moves is taken over by a keter started again: the shop
    // runs on, on its new port, and Nginx keeps routing there.
    let (pid, port) = (k.pid_of(SHOP), port_of(&k, SHOP));
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(k.root.join("etc/state/shop.json")).unwrap())
            .unwrap();
    assert_eq!(
        record["versions"][0]["procs"][0]["role"]["web"]["port"].to_string(),
        port,
        "{record}"
    );
    let _ = k.signal_and_wait(Signal::SIGKILL);
    k.launch();
    k.wait_log("keter: took over 2 apps", WAIT);
    assert_eq!(
        k.pid_of(SHOP),
        pid,
        "the shop was started again, not taken over"
    );
    assert_eq!(port_of(&k, SHOP), port);
    for _ in 0..20 {
        assert_eq!(k.get(SHOP, "/").unwrap().body.trim(), "shop-v1");
    }

    // A keter killed after writing the record of a move but before Nginx took it: Nginx
    // still routes to the squatted port. The next keter sees that the app's Nginx file and
    // its record disagree, and routes to the record's port before anything else.
    let _ = k.signal_and_wait(Signal::SIGKILL);
    let conf = k.root.join("nginx/apps/shop.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let upstream = format!("server 127.0.0.1:{port};");
    assert!(text.contains(&upstream), "{text}");
    fs::write(
        &conf,
        text.replace(&upstream, &format!("server 127.0.0.1:{};", taken[0])),
    )
    .unwrap();
    kill(Pid::from_raw(k.nginx_pid()), Signal::SIGHUP).unwrap();
    let start = Instant::now();
    while k.get(SHOP, "/").unwrap().body.trim() != SQUATTED {
        assert!(start.elapsed() < WAIT, "Nginx never took the stale file");
        std::thread::sleep(Duration::from_millis(10));
    }
    let routed = format!("shop: Nginx routes to ports [{port}]");
    let routed_before = k.log_count(&routed);
    k.launch();
    k.wait_log(
        &format!(
            "shop: its Nginx file routes to ports {{{}}} but its webapps use {{{port}}}",
            taken[0]
        ),
        WAIT,
    );
    k.wait_log_count(&routed, routed_before + 1, WAIT);
    for _ in 0..20 {
        assert_eq!(k.get(SHOP, "/").unwrap().body.trim(), "shop-v1");
    }
    assert_eq!(k.pid_of(SHOP), pid);
    for mut s in squatters {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn a_crash_of_the_serving_version_is_restarted_while_an_old_version_takes_its_stop_timeout() {
    // The old version ignores SIGTERM: its stop takes all of stop-timeout, then SIGKILL.
    let k = Keter::start_with(
        "slow-stop",
        Opts {
            stop_timeout: 30.0,
            drain_time: 1.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &["--ignore-term"]);
    k.wait_for(HOST, "v1", WAIT);
    let old = k.pid_of(HOST);
    k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
    let serving = k.pid_of(HOST);
    // The old version has drained and is being stopped: no longer retiring, still alive.
    let deadline = Instant::now() + WAIT;
    while crate::status::json(&k, "/api/apps/hello")["draining"] != 0 {
        assert!(Instant::now() < deadline, "v1 never drained:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        alive(old),
        "v1 ignores SIGTERM and should outlive its drain"
    );
    // The serving version crashes: it is started again at once, not after the old one's stop.
    let _ = k.get(HOST, "/exit");
    let deadline = Instant::now() + WAIT;
    let restarted = loop {
        if let Ok(r) = k.get(HOST, "/pid")
            && let Ok(pid) = r.body.trim().parse::<i32>()
            && pid != serving
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "v2 was not restarted:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        alive(old),
        "v2 (pid {restarted}) came back only after the old version's stop ended:\n{}",
        k.log()
    );
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v2");
    let report = crate::status::json(&k, "/api/apps/hello");
    assert_eq!(report["state"], "running", "{report}");
    // Not waited for here: the old version is killed at its stop-timeout.
    let _ = kill(Pid::from_raw(old), Signal::SIGKILL);
}
