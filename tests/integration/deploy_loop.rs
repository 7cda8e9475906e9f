//! The deploy loop (issue: a bundle copied in is served by Nginx, updated without a failed
//! request, stopped when deleted).

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

const HOST: &str = "hello.example.com";
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn start_creates_the_root_and_a_managed_nginx_with_a_default_server() {
    let k = Keter::start("start");
    for sub in ["incoming", "temp", "log", "etc", "nginx"] {
        assert!(k.root.join(sub).is_dir(), "{sub}/ missing");
    }
    let main = fs::read_to_string(k.root.join("nginx/nginx.conf")).unwrap();
    let prefix = k.root.join("nginx").display().to_string();
    for directive in [
        "pid ",
        "client_body_temp_path ",
        "proxy_temp_path ",
        "fastcgi_temp_path ",
        "uwsgi_temp_path ",
        "scgi_temp_path ",
    ] {
        let line = main
            .lines()
            .find(|l| l.trim_start().starts_with(directive))
            .unwrap_or_else(|| panic!("no {directive} in nginx.conf"));
        assert!(line.contains(&prefix), "{line} is not under {prefix}");
    }
    let r = k.get("unknown.example.com", "/").unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("No app is deployed"), "{r:?}");
}

#[test]
fn temp_is_wiped_at_start() {
    let mut k = Keter::start("wipe");
    let leftover = k.root.join("temp/hello-99");
    fs::create_dir_all(&leftover).unwrap();
    fs::write(leftover.join("file"), "x").unwrap();
    let _ = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    k.launch();
    assert!(!leftover.exists(), "temp/ was not wiped at start");
}

#[test]
fn a_bundle_copied_in_is_served_with_keters_environment() {
    let k = Keter::start_with(
        "env",
        Opts {
            extra: "env: {GLOBAL_VAR: from-global, SHARED: global}\n".into(),
            ..Opts::default()
        },
    );
    let yaml = format!(
        "{}env: {{BUNDLE_VAR: from-bundle, SHARED: bundle}}\n",
        hello_yaml("v1", "Hello.Example.com", &[])
    );
    let bundle = k.dir.0.join("hello.keter");
    BundleBuilder::hello(&yaml).write(&bundle);
    // A plain `cp` (written in place), not a rename.
    fs::copy(&bundle, k.incoming().join("hello.keter")).unwrap();
    k.wait_for(HOST, "v1", WAIT);

    let env = k.get(HOST, "/env").unwrap().body;
    let vars: Vec<&str> = env.lines().collect();
    let port = vars
        .iter()
        .find_map(|v| v.strip_prefix("PORT="))
        .expect("PORT is set");
    assert!(
        vars.contains(&format!("YESOD_PORT={port}").as_str()),
        "{env}"
    );
    // The first host as written, as Keter builds APPROOT.
    assert!(vars.contains(&"APPROOT=http://Hello.Example.com"), "{env}");
    assert!(
        vars.contains(&"YESOD_APPROOT=http://Hello.Example.com"),
        "{env}"
    );
    assert!(vars.contains(&"GLOBAL_VAR=from-global"), "{env}");
    assert!(vars.contains(&"BUNDLE_VAR=from-bundle"), "{env}");
    assert!(
        vars.contains(&"SHARED=bundle"),
        "stanza env wins over global env: {env}"
    );
    assert!(vars.contains(&"PATH=/usr/local/bin:/usr/bin:/bin"), "{env}");
    assert!(
        !env.contains("KETER_TEST_SECRET"),
        "keter's own environment leaked into the app: {env}"
    );

    // The app runs in the bundle root, its output goes to log/app-hello.log.
    let app_log = fs::read_to_string(k.root.join("log/app-hello.log")).unwrap();
    assert!(app_log.contains("hello v1: listening on port"), "{app_log}");

    // The generated file is for people: header with bundle, checksum and generation.
    let conf = fs::read_to_string(k.root.join("nginx/apps/hello.conf")).unwrap();
    assert!(
        conf.starts_with("# keter: app hello, bundle hello.keter\n# sha256 "),
        "{conf}"
    );
    assert!(conf.contains("Nginx configuration generation"), "{conf}");
    for needle in [
        "keepalive 32;",
        "proxy_http_version 1.1;",
        "proxy_set_header Host $host;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto http;",
        "proxy_set_header Upgrade $http_upgrade;",
    ] {
        assert!(conf.contains(needle), "{needle} missing from:\n{conf}");
    }
    // Another host still gets the default server, not this app.
    let other = k.get("other.example.com", "/").unwrap();
    assert_eq!(other.status, 404);
}

#[test]
fn bundles_already_in_incoming_deploy_at_start_and_both_formats_parse() {
    let dir = TempDir::new("prestart");
    let incoming = dir.0.join("bundles");
    fs::create_dir_all(&incoming).unwrap();
    let flat = incoming.join("flat.keter");
    BundleBuilder::hello(&hello_yaml("flat-v1", "flat.example.com", &[])).write(&flat);
    let stanza = incoming.join("stanza.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    args: [--version-string, stanza-v1]\n    hosts: [stanza.example.com, www.stanza.example.com]\n    health-check-path: /pid\n",
    )
    .write(&stanza);

    let mut k = Keter::start("prestart-k");
    let _ = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    fs::copy(&flat, k.incoming().join("flat.keter")).unwrap();
    fs::copy(&stanza, k.incoming().join("stanza.keter")).unwrap();
    k.launch();
    k.wait_for("flat.example.com", "flat-v1", WAIT);
    k.wait_for("stanza.example.com", "stanza-v1", WAIT);
    k.wait_for("www.stanza.example.com", "stanza-v1", WAIT);
}

#[test]
fn unknown_stanzas_are_refused_with_a_clear_error() {
    let k = Keter::start("unsupported");
    let bundle = k.dir.0.join("s.keter");
    BundleBuilder::hello(
        "stanzas:\n  - type: webapp\n    exec: ../dist/hello\n    host: s.example.com\n  - type: teleport\n    hosts: [far.example.com]\n",
    )
    .write(&bundle);
    k.deploy("s", &bundle);
    k.wait_log(
        "s.keter: config/keter.yaml: stanzas[1].type: unknown stanza type \"teleport\"",
        WAIT,
    );
    assert_eq!(k.get("s.example.com", "/").unwrap().status, 404);
    // The refused version's folder goes in a stage that may end just after the log line.
    k.wait_temp_folders(0, WAIT);
}

/// The heart of keter: continuous requests, on new and on keep-alive connections, across ten
/// consecutive redeploys, and not one fails.
#[test]
fn redeploys_under_continuous_traffic_lose_no_request() {
    let k = Keter::start_with(
        "traffic",
        Opts {
            drain_time: 5.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v0", HOST, &[]);
    k.wait_for(HOST, "v0", WAIT);

    let stop = Arc::new(AtomicBool::new(false));
    let addr = k.addr();
    let mut clients = Vec::new();
    for keep_alive in [false, true, false, true] {
        let stop = stop.clone();
        clients.push(std::thread::spawn(move || {
            let mut failures: Vec<String> = Vec::new();
            let mut seen: Vec<String> = Vec::new();
            let mut ok = 0u32;
            let mut client = KeepAliveClient::new(addr);
            while !stop.load(Ordering::Relaxed) {
                let r = if keep_alive {
                    client.get(HOST, "/")
                } else {
                    // Paced: a closed connection holds its port pair in TIME_WAIT for a
                    // minute, and an unpaced loop would exhaust the ephemeral ports.
                    std::thread::sleep(Duration::from_millis(4));
                    keter::probe::get_tcp(addr, HOST, "/", Duration::from_secs(10))
                };
                match r {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        let v = r.body.trim().to_string();
                        if seen.last() != Some(&v) {
                            seen.push(v);
                        }
                    }
                    Ok(r) => failures.push(format!("status {}: {}", r.status, r.body.trim())),
                    Err(e) => failures.push(format!("error: {e}")),
                }
            }
            (
                keep_alive,
                ok,
                failures,
                seen,
                client.reused,
                client.resent_after_idle_close,
            )
        }));
    }

    let mut switch_times = Vec::new();
    for i in 1..=10 {
        let v = format!("v{i}");
        let t = Instant::now();
        k.deploy_hello("hello", &v, HOST, &[]);
        k.wait_for(HOST, &v, WAIT);
        switch_times.push(t.elapsed());
    }
    // Let the last old version drain and stop under traffic too.
    k.wait_deploy("hello", 11, WAIT);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);

    let mut total_ok = 0;
    for c in clients {
        let (keep_alive, ok, failures, seen, reused, resent) = c.join().unwrap();
        eprintln!(
            "client keep_alive={keep_alive}: {ok} ok, {} failed, {reused} on reused connections, {resent} resent after an idle close; {} version changes seen",
            failures.len(),
            seen.len()
        );
        assert!(
            failures.is_empty(),
            "failed requests: {failures:?}\n{}",
            k.log()
        );
        // For about 100 ms after a reload Nginx's old workers still accept connections, so a
        // client may see the old and new versions alternate briefly; it ends on the newest.
        assert_eq!(seen.last().map(String::as_str), Some("v10"));
        if keep_alive {
            assert!(
                reused > 0,
                "the keep-alive client never reused a connection"
            );
        }
        total_ok += ok;
    }
    eprintln!("switch times: {switch_times:?}; {total_ok} successful requests");
    assert!(
        total_ok > 100,
        "too little traffic to mean anything: {total_ok}"
    );

    // Every old version is stopped, its port freed and its folder deleted.
    k.wait_temp_folders(1, WAIT);
    assert_eq!(k.log_count("; stopping it"), 10, "{}", k.log());
    assert_eq!(
        k.log_count("superseded"),
        0,
        "a repeated event restarted a deploy:\n{}",
        k.log()
    );
}

#[test]
fn a_version_that_never_gets_ready_is_removed_and_the_old_one_keeps_serving() {
    let k = Keter::start_with(
        "never-ready",
        Opts {
            readiness_timeout: 2.0,
            ..Opts::default()
        },
    );
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let good_pid = k.pid_of(HOST);

    let cases: [(&str, &[&str], &str); 3] = [
        ("crash", &["--crash"], "exited with exit code 3"),
        ("silent", &["--never-listen"], "never listened on port"),
        ("broken", &["--status", "500"], "answered 500"),
    ];
    for (version, args, reason) in cases {
        let before = k.last_deploy("hello");
        k.deploy_hello("hello", version, HOST, args);
        let deadline = Instant::now() + WAIT;
        while !k
            .last_deploy("hello")
            .is_some_and(|d| Some(&d) != before.as_ref())
        {
            // The old version answers all along.
            let r = k.get(HOST, "/").unwrap();
            assert_eq!((r.status, r.body.trim()), (200, "v1"), "during {version}");
            assert!(
                Instant::now() < deadline,
                "{version} never failed:\n{}",
                k.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let last = k.last_deploy("hello").unwrap();
        assert_eq!(last.result, DeployResult::Failed, "{version}: {last:?}");
        let log = k.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("deploy of hello.keter failed"))
            .unwrap();
        assert!(line.contains(reason), "{version}: {line}");
        assert!(
            line.contains("the previous version keeps serving"),
            "{line}"
        );
        assert!(
            line.contains("last output:"),
            "what the app printed is missing: {line}"
        );
        assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "v1");
        k.wait_temp_folders(1, WAIT);
    }
    assert!(alive(good_pid));
    // No process of a failed version is left.
    let hello_procs = procs_named("hello");
    let ours: Vec<i32> = hello_procs
        .into_iter()
        .filter(|pid| cwd_under(*pid, &k.root))
        .collect();
    assert_eq!(ours, vec![good_pid]);
    // And a good version still deploys afterwards.
    k.deploy_hello("hello", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
}

#[test]
fn deleting_the_bundle_stops_the_app() {
    let k = Keter::start("delete");
    k.deploy_hello("hello", "v1", HOST, &["--spawn-child"]);
    k.deploy_hello("other", "o1", "other.example.com", &[]);
    k.wait_for(HOST, "v1", WAIT);
    k.wait_for("other.example.com", "o1", WAIT);
    let pid = k.pid_of(HOST);
    let group_before = group_size(pid);
    assert!(group_before >= 2, "the --spawn-child grandchild is missing");

    fs::remove_file(k.incoming().join("hello.keter")).unwrap();
    k.wait_stopped("hello", WAIT);
    let r = k.get(HOST, "/").unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("No app is deployed"), "{r:?}");
    assert!(!k.root.join("nginx/apps/hello.conf").exists());
    assert!(wait_gone(pid, Duration::from_secs(5)));
    assert_eq!(group_size(pid), 0, "the app's grandchild survived");
    k.wait_temp_folders(1, WAIT);
    // The other app is untouched.
    k.wait_for("other.example.com", "o1", WAIT);
}

#[test]
fn the_same_bundle_copied_again_is_not_redeployed() {
    let k = Keter::start("same");
    let bundle = k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let pid = k.get(HOST, "/pid").unwrap().body;
    k.deploy("hello", &bundle);
    k.wait_deploy_result("hello", DeployResult::Unchanged, WAIT);
    assert_eq!(k.get(HOST, "/pid").unwrap().body, pid);
    assert_eq!(k.app_status("hello").unwrap().deploy, Some(1));
}

#[test]
fn sigterm_stops_every_app_and_nginx_and_exits_zero() {
    let mut k = Keter::start("sigterm");
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.deploy_hello("b", "b1", "b.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    k.wait_for("b.example.com", "b1", WAIT);
    let pids: Vec<i32> = ["a.example.com", "b.example.com"]
        .iter()
        .map(|h| k.pid_of(h))
        .collect();
    let nginx = k.nginx_pid();
    let status = k.signal_and_wait(nix::sys::signal::Signal::SIGTERM);
    assert!(status.success(), "{status}");
    for pid in pids.iter().chain([&nginx]) {
        assert!(!alive(*pid), "pid {pid} survived keter's exit");
    }
    assert!(k.get("a.example.com", "/").is_err(), "Nginx still answers");
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut k = Keter::start("sigint");
    k.deploy_hello("a", "a1", "a.example.com", &[]);
    k.wait_for("a.example.com", "a1", WAIT);
    let pid = k.pid_of("a.example.com");
    let status = k.signal_and_wait(nix::sys::signal::Signal::SIGINT);
    assert!(status.success(), "{status}");
    assert!(!alive(pid));
}

#[test]
fn a_killed_managed_nginx_is_restarted() {
    let k = Keter::start("nginx-dies");
    k.deploy_hello("hello", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    let old = k.nginx_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    k.wait_log("restarting it", WAIT);
    let deadline = Instant::now() + WAIT;
    while k.log_count("nginx: started the master") < 2 {
        assert!(Instant::now() < deadline, "no new master:\n{}", k.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    k.wait_for(HOST, "v1", WAIT);
    assert_ne!(k.nginx_pid(), old);
    assert!(!alive(old));
}

#[test]
fn invalid_bundle_names_in_incoming_are_reported_once() {
    let k = Keter::start("badname");
    let bundle = k.dir.0.join("x.keter");
    BundleBuilder::hello(&hello_yaml("v1", HOST, &[])).write(&bundle);
    fs::copy(&bundle, k.incoming().join("bad name;.keter")).unwrap();
    k.wait_log("refused: the app name \"bad name;\" contains ' '", WAIT);
    fs::copy(&bundle, k.incoming().join("bad name;.keter")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(k.log_count("refused: the app name"), 1);
}

#[test]
fn hosts_claimed_by_another_app_are_refused() {
    let k = Keter::start("conflict");
    k.deploy_hello("first", "f1", HOST, &[]);
    k.wait_for(HOST, "f1", WAIT);
    k.deploy_hello("second", "s1", HOST, &[]);
    let refused = k.wait_deploy_result("second", DeployResult::Failed, WAIT);
    assert_eq!(
        refused.error_kind.as_deref(),
        Some("host-taken"),
        "{refused:?}"
    );
    assert!(
        refused.error.as_ref().is_some_and(
            |e| e.contains("the host hello.example.com is already served by the app first")
        ),
        "{refused:?}"
    );
    assert_eq!(k.get(HOST, "/").unwrap().body.trim(), "f1");
}

fn procs_named(name: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

fn cwd_under(pid: i32, root: &std::path::Path) -> bool {
    fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(root))
}

fn group_size(pgid: i32) -> usize {
    keter::procfs::group_members(pgid).len()
}

#[test]
fn apps_with_a_large_chunked_home_page_or_connections_kept_open_become_ready() {
    let k = Keter::start("big-home");
    // A Yesod page of 240 KiB streamed in chunks, and a server that keeps the connection open
    // after its answer although the check asked to close it: only the status line counts.
    let cases: [(&str, &[&str]); 2] = [
        ("yesod", &["--home-kb", "240"]),
        ("sticky", &["--home-kb", "1", "--keep-open"]),
    ];
    for (name, args) in cases {
        let host = format!("{name}.example.com");
        k.deploy_hello(name, "v1", &host, args);
    }
    for (name, _) in cases {
        let host = format!("{name}.example.com");
        k.wait_deploy(name, 1, WAIT);
        assert_eq!(k.get(&host, "/host").unwrap().body.trim(), host);
    }
    assert!(!k.log().contains("deploy of"), "{}", k.log());
}

/// Threads of the keter process named `name`.
fn threads_named(keter: i32, name: &str) -> usize {
    fs::read_dir(format!("/proc/{keter}/task"))
        .unwrap()
        .flatten()
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
        .count()
}

#[test]
fn a_deleted_apps_worker_ends_and_a_new_bundle_gets_a_new_one() {
    let k = Keter::start("worker-ends");
    k.deploy_hello("gone", "v1", HOST, &[]);
    k.wait_for(HOST, "v1", WAIT);
    assert_eq!(threads_named(k.pid(), "app-gone"), 1);
    fs::remove_file(k.incoming().join("gone.keter")).unwrap();
    k.wait_stopped("gone", WAIT);
    let start = Instant::now();
    while threads_named(k.pid(), "app-gone") > 0 {
        assert!(
            start.elapsed() < WAIT,
            "the worker of a deleted app is still there:\n{}",
            k.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same name again is a new app with a worker of its own.
    k.deploy_hello("gone", "v2", HOST, &[]);
    k.wait_for(HOST, "v2", WAIT);
    assert_eq!(threads_named(k.pid(), "app-gone"), 1);
}
